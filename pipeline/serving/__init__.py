"""Serving: the loaded model bundle (Classifier), image reading (JPEG/PNG/DICOM), batch prediction,
Grad-CAM, drift, the REST service and the MLflow pyfunc. Used by the hospital side and by packaging."""
