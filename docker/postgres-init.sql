-- Separate databases in the one Postgres: Airflow's (POSTGRES_DB), MLflow's, MLflow auth's.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
