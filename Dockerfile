# Airflow image for the api-server, scheduler, dag-processor, triggerer and the CPU worker:
# Airflow 3.3.2 plus the pipeline's runtime from the shared lock (CPU torch).
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
USER airflow
COPY requirements/ /tmp/requirements/
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -r /tmp/requirements/base.txt -c /tmp/requirements/constraints.txt \
      apache-airflow-providers-fab
COPY --chown=airflow:root pyproject.toml /opt/airflow/project/
COPY --chown=airflow:root ml/ /opt/airflow/project/ml/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow/project
