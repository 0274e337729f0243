#!/bin/sh
# Run by the postgres image on its first start (an empty data volume): one database for MLflow's
# runs and registry, one for Prefect, both owned by POSTGRES_USER. Idempotent.
set -eu
for db in "$MLFLOW_DB" "$PREFECT_DB"; do
  if [ -z "$(psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
    psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
  fi
done
