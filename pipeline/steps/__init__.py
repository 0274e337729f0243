"""Steps: one thin module per DVC stage, the stage list that dvc.yaml is generated from, and the CLI."""
