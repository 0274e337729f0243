"""Data: ingest (synthetic, local, Kaggle), file naming, the index table, patient-grouped splits,
validation with Great Expectations, and the data version. Knows nothing of models."""
