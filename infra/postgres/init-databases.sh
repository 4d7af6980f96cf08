#!/bin/sh
# Second database for MLflow beside Prefect's (POSTGRES_DB). Runs once, on an empty volume.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE mlflow;
SQL
