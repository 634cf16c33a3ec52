"""The train task as Kubernetes pods (plugins/k8s_train.py), rendered by the provider's own code without
a cluster: templates rendered as a task run renders them, then KubernetesPodOperator.build_pod_request_obj,
and the command read back by torchrun's own argument parser."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import airflow  # noqa: F401  (puts plugins/ on sys.path, as for DAGs)
import pytest
import yaml
from conftest import ROOT

from ml.config import load_config, project_root
from ml.runs import run_folder_name, run_paths

RUN_ID = "manual__2026-12-07T10:00:00+00:00"
RUN_KEY = f"retrain_lora__{RUN_ID}"
IMAGE = "registry.example.org/lora-retrain/airflow-gpu:latest"
# What a worker's environment holds: none of it may reach the pod spec as a value.
WORKER_SECRETS = {"HF_TOKEN": "hf_worker-token-9f3a", "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-7c1e",
                  "AIRFLOW__CORE__FERNET_KEY": "fernet-key-2b8d"}


def _render(op: Any, dag: Any, params: dict[str, Any]) -> Any:
    """The pod this task would ask the cluster for: its templates rendered against a run's context (the
    fields a task instance gives the provider's pod labels), then the provider's pod request."""
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=op.task_id, map_index=-1, try_number=1)
    context = {"dag": dag, "task": op, "ti": ti, "run_id": RUN_ID, "params": params}
    op.render_template_fields(context)
    return op.build_pod_request_obj(context, dry_run=True)


def _pods(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> tuple[Any, list[Any]]:
    from airflow.sdk import DAG
    from k8s_train import train_pods

    for name, value in WORKER_SECRETS.items():
        monkeypatch.setenv(name, value)
    with DAG("retrain_lora", schedule=None) as dag:
        pods = train_pods(image=IMAGE, claim="retrain-state", namespace="ml", **kwargs)
    return dag, pods


def _launch(pod: Any) -> tuple[Any, Any, list[str]]:
    """torchrun's reading of the container's command: its arguments, its launch config, the trainer's argv."""
    from torch.distributed.run import config_from_args, get_args_parser

    (container,) = pod.spec.containers
    assert container.command == ["python"] and container.args[:2] == ["-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(container.args[2:])
    config, _, trainer = config_from_args(args)
    return args, config, trainer


def _no_secret_value(pod: Any) -> None:
    spec = json.dumps(pod.to_dict(), default=str)
    for name, value in WORKER_SECRETS.items():
        assert value not in spec, f"{name}'s value is in the pod spec"
    (container,) = pod.spec.containers
    (token,) = [e for e in container.env if e.name == "HF_TOKEN"]
    assert token.value is None and token.value_from.secret_key_ref.to_dict() == {
        "name": "retrain-train", "key": "hf-token", "optional": True}
    assert not any(e.name.startswith(("MLFLOW_", "AIRFLOW")) for e in container.env)  # the trainer needs neither


def test_one_node_pod_runs_the_launcher_on_the_run_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # torchrun's parser sets it where unset
    dag, (pod_task,) = _pods(monkeypatch, gpus=8)
    assert pod_task.task_id == "train"
    pod = _render(pod_task, dag, {"profile": "demo"})
    (container,) = pod.spec.containers
    folder = run_paths(load_config("demo"), RUN_KEY).root
    args, config, trainer = _launch(pod)
    assert args.standalone and args.module and (config.min_nodes, config.max_nodes) == (1, 1)
    assert config.nproc_per_node == 8
    assert [args.training_script, *args.training_script_args] == [
        "ml", "train", "--config", str(folder / "config.json"), "--run-key", RUN_KEY]
    assert container.resources.limits == {"nvidia.com/gpu": "8"}
    assert container.image == IMAGE and pod.metadata.namespace == "ml"
    # the run folder is on the claim, mounted where the workers have it, and the trainer's root is theirs
    volumes = {v.name: v for v in pod.spec.volumes}
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    assert volumes["state"].persistent_volume_claim.claim_name == "retrain-state"
    assert mounts["state"] == str(project_root() / "state") and folder.is_relative_to(mounts["state"])
    assert volumes["dshm"].empty_dir.medium == "Memory" and mounts["dshm"] == "/dev/shm"
    assert {"name": "RETRAIN_PROJECT_ROOT", "value": str(project_root())} in [
        {"name": e.name, "value": e.value} for e in container.env]
    _no_secret_value(pod)
    # the provider's labels find the pod of this task instance again (a worker that died reattaches)
    assert pod.metadata.labels["dag_id"] == "retrain_lora" and pod.metadata.labels["task_id"] == "train"
    assert pod.spec.hostname is None and pod.spec.restart_policy == "Never"


def test_several_nodes_meet_at_rank_zeros_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    from k8s_train import RDZV_JOIN_TIMEOUT_S, RDZV_LABEL, RDZV_PORT
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    dag, tasks = _pods(monkeypatch, gpus=4, nodes=2)
    assert [t.task_id for t in tasks] == ["train_node_0", "train_node_1"]
    pods = [_render(t, dag, {"profile": "demo"}) for t in tasks]
    endpoint = f"retrain-train-0.retrain-train:{RDZV_PORT}"
    for rank, pod in enumerate(pods):
        args, config, _ = _launch(pod)
        assert not args.standalone and (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 4)
        assert (config.rdzv_backend, config.rdzv_endpoint) == ("c10d", endpoint)
        assert config.run_id == run_folder_name(RUN_KEY)  # one rendezvous per run, the same for every node
        params = RendezvousParameters(config.rdzv_backend, config.rdzv_endpoint, config.run_id, 2, 2,
                                      **config.rdzv_configs)
        assert params.get_as_bool("is_host") is (rank == 0)  # rank 0 hosts the store: said, not guessed
        assert params.get_as_int("join_timeout") == RDZV_JOIN_TIMEOUT_S
        # <hostname>.<subdomain>: the name the endpoint gives rank 0, through the headless Service
        assert (pod.spec.hostname, pod.spec.subdomain) == (f"retrain-train-{rank}", "retrain-train")
        assert pod.metadata.labels[RDZV_LABEL] == "retrain-train"
        assert pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "4"}
        _no_secret_value(pod)
    assert pods[0].spec.containers[0].ports[0].container_port == RDZV_PORT


def test_the_documented_service_and_secret_fit_the_pods() -> None:
    """docs/deployment.md's manifest: a headless Service by the rendezvous' name, selecting the pods'
    label, on the rendezvous port, with DNS names before the pods are ready (rank 0 resolves itself)."""
    from k8s_train import RDZV_LABEL, RDZV_PORT, SECRET_ENV

    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    section = text[text.index("## Past one host: Kubernetes"):]
    docs = [d for block in re.findall(r"```yaml\n(.*?)```", section, re.S) for d in yaml.safe_load_all(block)]
    (service,) = [d for d in docs if d and d.get("kind") == "Service"]
    assert service["metadata"]["name"] == "retrain-train"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {RDZV_LABEL: "retrain-train"}
    assert [p["port"] for p in service["spec"]["ports"]] == [RDZV_PORT]
    # the Secret, made from a file (no token in a manifest or the shell's history), with the key the pod reads
    assert "create secret generic retrain-train --from-file=hf-token=" in section
    assert SECRET_ENV == {"HF_TOKEN": "hf-token"}


def test_a_run_folder_off_the_claim_fails_with_the_setting_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    dag, (pod_task,) = _pods(monkeypatch)
    # the test profile's output_dir is in the session's temp folder, not under <project root>/state
    with pytest.raises(AirflowFailException, match=r"output_dir .* is not on the claim mounted at"):
        _render(pod_task, dag, {"profile": "e2e"})
    with pytest.raises(AirflowFailException, match="unknown profile"):
        _render(pod_task, dag, {"profile": "nope"})


@pytest.mark.parametrize(("kwargs", "message"), [({"gpus": 0}, "gpus >= 1"), ({"nodes": 2, "rank": 2}, "rank 2")])
def test_bad_shapes_are_refused_when_the_dag_is_parsed(kwargs: dict[str, Any], message: str) -> None:
    from k8s_train import TrainPod

    with pytest.raises(ValueError, match=message):
        TrainPod(task_id="train", image=IMAGE, claim="retrain-state", **kwargs)


def test_the_dag_with_pods_serializes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the dag-processor stores of a DAG that trains in pods: the custom operator's fields included."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag, _ = _pods(monkeypatch, gpus=2, nodes=2)
    tasks = DagSerialization.to_dict(dag)["dag"]["tasks"]
    assert {t["__var"]["task_id"] for t in tasks} == {"train_node_0", "train_node_1"}


def test_airflow_does_not_load_the_route_as_a_plugin() -> None:
    """Airflow imports every plugin module in each of its processes; the provider takes a second to import,
    so plugins/.airflowignore leaves k8s_train to the DAG that uses it."""
    import subprocess
    import sys

    code = ("import sys; from airflow import plugins_manager; info = plugins_manager.get_plugin_info(); "
            "assert info and plugins_manager.get_import_errors() == {}; "
            "print(sorted({'k8s_train', 'airflow.providers.cncf.kubernetes.operators.pod'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
