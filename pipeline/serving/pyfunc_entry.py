"""The pyfunc model as code (MLflow's models-from-code): logged by file path, so nothing is pickled."""

from mlflow.models import set_model

from pipeline.serving.pyfunc_model import ChestXrayClassifier

set_model(ChestXrayClassifier())
