"""The train task as Kubernetes pods: the route past one host (docs/deployment.md, "Past one host:
Kubernetes"). Opt-in: the DAG as shipped trains on the Celery GPU worker; `train_pods(...)` in place
of its `train` task runs the same trainer (`python -m ml train` on the run's frozen config) under
torchrun in pods of a cluster, one pod per node, one process per GPU the pod asks for.

One node: `torchrun --standalone`. Several: each node's pod runs `--nnodes N --rdzv-backend c10d
--rdzv-endpoint <rendezvous>-0.<rendezvous>:29500 --rdzv-id <run folder>`; the rank-0 pod hosts the
rendezvous (said with `is_host`, not guessed from host names) under a stable DNS name, made of its
hostname and a headless Service named `rendezvous` that the cluster's admin creates once.

The run folder lies on a PersistentVolumeClaim mounted where the Airflow workers have the state
volume (ReadWriteMany where several nodes share it): the trainer reads the run's frozen config there
and leaves its adapter there for `evaluate`. Credentials come from a Kubernetes Secret by reference
(secretKeyRef), never as values in the spec. The trainer imports no MLflow (`register` logs its curve
from the run folder afterwards), so the pod gets no MLflow account.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import models as k8s

from ml.config import project_root
from ml.errors import ConfigError
from ml.params import config_from_params
from ml.runs import run_folder_name, run_paths

RDZV_PORT = 29500  # torchrun's default rendezvous port
RDZV_LABEL = "retrain-rendezvous"  # the headless Service selects a multi-node training's pods by it
# A node that died fails its peers only at NCCL's timeout (10 minutes); their retries must still meet
# the retry of the one that died first, so the rendezvous waits longer than torchrun's 600 s.
RDZV_JOIN_TIMEOUT_S = 1800
# The hub token for a gated base model (the default profile's Llama 3.1); optional: a public model needs none.
SECRET_ENV = {"HF_TOKEN": "hf-token"}
# Settings of the workers' environment that the trainer reads too; none of them secret.
PASSED_ENV = ("HF_HOME", "HF_HUB_OFFLINE")


class TrainPod(KubernetesPodOperator):
    """One node's pod of the train task: torchrun with `gpus` processes on the run's frozen config.
    `claim`: the PersistentVolumeClaim of the run folders, mounted at `mount_path` (default: the
    workers' `<project root>/state`); `secret`: the Kubernetes Secret that `secret_env` maps
    environment variables to keys of; other keyword arguments go to KubernetesPodOperator
    (namespace, node_selector, tolerations, retries, execution_timeout, deferrable...)."""

    template_fields = (*KubernetesPodOperator.template_fields, "run_key")

    def __init__(self, *, image: str, claim: str, gpus: int = 1, nodes: int = 1, rank: int = 0,
                 run_key: str = "{{ dag.dag_id }}__{{ run_id }}",  # the DAG's run key (retrain_lora._run)
                 rendezvous: str = "retrain-train", secret: str = "retrain-train",
                 secret_env: Mapping[str, str] = SECRET_ENV, mount_path: str | None = None, **kwargs: Any) -> None:
        if gpus < 1 or nodes < 1:
            raise ValueError(f"a training pod needs gpus >= 1 and nodes >= 1, not gpus={gpus}, nodes={nodes}")
        if not 0 <= rank < nodes:
            raise ValueError(f"rank {rank} is not one of the {nodes} nodes (0 to {nodes - 1})")
        self.gpus, self.nodes, self.rank, self.run_key, self.rendezvous = gpus, nodes, rank, run_key, rendezvous
        root = project_root()
        self.mount_path = Path(mount_path) if mount_path else root / "state"
        env = [k8s.V1EnvVar(name=name, value=value) for name, value in
               {"RETRAIN_PROJECT_ROOT": str(root), "PYTHONUNBUFFERED": "1",
                **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}}.items()]
        env += [k8s.V1EnvVar(name=name, value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=secret, key=key, optional=True)))
            for name, key in secret_env.items()]
        several = nodes > 1
        super().__init__(
            image=image, name="retrain-train", cmds=["python"], env_vars=env,
            container_resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}),
            volumes=[k8s.V1Volume(name="state", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                         claim_name=claim)),
                     # NCCL and the data loaders share memory through /dev/shm, 64 MiB in a container
                     k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory"))],
            volume_mounts=[k8s.V1VolumeMount(name="state", mount_path=str(self.mount_path)),
                           k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
            # the DNS name <rendezvous>-0.<rendezvous> of rank 0, through the headless Service
            hostname=f"{rendezvous}-{rank}" if several else None, subdomain=rendezvous if several else None,
            labels={RDZV_LABEL: rendezvous} if several else None,
            ports=[k8s.V1ContainerPort(name="rdzv", container_port=RDZV_PORT)] if several and rank == 0 else None,
            **kwargs)

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """The launcher's command line, once the run key is rendered: the run folder is the one the
        DAG's other tasks use, from the run's Params as they compute it."""
        super().render_template_fields(context, jinja_env)
        try:
            cfg = config_from_params(dict(context["params"]))
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from None
        config = run_paths(cfg, self.run_key).config
        if not config.is_relative_to(self.mount_path):
            raise AirflowFailException(
                f"output_dir {cfg.output_dir} ({config.parent.parent}) is not on the claim mounted at "
                f"{self.mount_path}: the training pod could not read the run folder")
        self.arguments = self.launcher(config)

    def launcher(self, config: Path) -> list[str]:
        """`python` + these: torchrun, then the trainer on the run's frozen config."""
        if self.nodes == 1:
            rdzv = ["--standalone"]
        else:
            conf = f"is_host={int(self.rank == 0)},join_timeout={RDZV_JOIN_TIMEOUT_S}"
            rdzv = ["--nnodes", str(self.nodes), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{self.rendezvous}-0.{self.rendezvous}:{RDZV_PORT}",
                    "--rdzv-id", run_folder_name(self.run_key), "--rdzv-conf", conf]
        return ["-m", "torch.distributed.run", *rdzv, "--nproc-per-node", str(self.gpus),
                "-m", "ml", "train", "--config", str(config), "--run-key", self.run_key]


def train_pods(*, image: str, claim: str, gpus: int = 1, nodes: int = 1, **kwargs: Any) -> list[TrainPod]:
    """The train task: `train`, one pod, on one node; on several, `train_node_0` .. `train_node_<N-1>`,
    one pod each, which must all run at once (they meet at the rendezvous)."""
    if nodes == 1:
        return [TrainPod(task_id="train", image=image, claim=claim, gpus=gpus, **kwargs)]
    return [TrainPod(task_id=f"train_node_{rank}", image=image, claim=claim, gpus=gpus, nodes=nodes, rank=rank,
                     **kwargs) for rank in range(nodes)]
