"""Registry: MLflow tracking, the champion policy, packing a model for serving, the model card."""
