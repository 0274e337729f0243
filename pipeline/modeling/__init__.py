"""Modeling: the tf.data input pipeline, Keras models, training, evaluation and metrics, the saved model."""
