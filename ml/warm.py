"""What `python -m ml pipeline` does while its trainer process trains: make the later steps start warm.

The pipeline's own process waits for the trainer (minutes) and then evaluates and registers,
and those steps spent most of their time in one-off work: importing the registry's modules
(MLflow's model flavors, matplotlib) and MLflow's map of the installed packages, which it
builds to check a logged model's requirements against the environment (one pass over every
installed distribution's file list: about a second on the GPU machine, whose CUDA wheels
list thousands of files; docs/benchmarks.md). Done here in a thread meanwhile, they cost no
wall time. `train.warm_up_later_steps` switches it off; an Airflow run's steps are processes
of their own, so its train task does none of this.

MLflow's map is built by a private function: this module is the only place that calls it,
and a MLflow without it only makes registering slower, not wrong.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def warm_up_later_steps() -> None:
    """Import what evaluate and register use and build MLflow's package map; a failure is logged, not
    raised (those steps would do it themselves)."""
    start = time.perf_counter()
    try:
        import mlflow.pyfunc  # noqa: F401  (the registered model's flavor)
        from mlflow.utils import requirements_utils

        import ml.promotion  # noqa: F401
        import ml.registry  # noqa: F401

        build_map = getattr(requirements_utils, "_init_packages_to_modules_map", None)
        if build_map is not None:
            build_map()
    except Exception:
        log.warning("warming up the later steps failed; they will do it themselves", exc_info=True)
        return
    log.info("the later steps' imports and MLflow's package map are ready (%.1fs, while training)",
             time.perf_counter() - start)
