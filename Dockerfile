# Airflow image for the api-server, scheduler, dag-processor, triggerer and the CPU worker:
# Airflow 3.3.2 plus the pipeline's runtime from the shared lock (CPU torch) and the FAB auth
# manager. TORCH_INDEX_URL is where pip finds the CPU build of torch: PyTorch's index, or a
# mirror of it (docker compose build --build-arg TORCH_INDEX_URL=...).
FROM apache/airflow:3.3.2-python3.11
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
USER root
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
USER airflow
COPY requirements/ /tmp/requirements/
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
      -r /tmp/requirements/base.txt -r /tmp/requirements/stack.txt -c /tmp/requirements/constraints.txt
COPY --chown=airflow:root pyproject.toml /opt/airflow/project/
COPY --chown=airflow:root ml/ /opt/airflow/project/ml/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow/project
