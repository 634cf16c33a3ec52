"""`python -m ml pipeline`: every step in order in one process, without Airflow, and what that one
process can overlap that an Airflow run (a process per task) cannot:

- the gate runs in a spawned worker process (the only one that imports Great Expectations) while
  this one runs preflight and fetches the champion; nothing trains before the gate has passed;
- while the trainer's process trains, this one imports what evaluate and register use and builds
  MLflow's map of the installed packages (`warm_up_later_steps`), so those steps start at once.

MLflow builds that map to check a logged model's requirements against the environment, with a
private function: this module is the only place that calls it, and an MLflow without it only
makes registering slower, not wrong. `train.warm_up_later_steps` switches the warm-up off.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from ml import configure_logging
from ml.config import PipelineConfig, tracking_uri
from ml.pipeline.data_steps import freeze, load, preflight, prepare, validate
from ml.pipeline.evaluate_step import evaluate
from ml.pipeline.release import keep, promote, register
from ml.pipeline.train_step import fetch_champion, train
from ml.runs import run_paths

log = logging.getLogger(__name__)


def run_all(cfg: PipelineConfig, run_key: str, force: bool = False) -> dict[str, Any]:
    """Every step in order; the wall time of each comes back as `seconds`. Unless `force`, a run whose
    data and training settings equal the champion's stops after preflight. The gate's worker is
    spawned: a script calling this needs `if __name__ == "__main__":`."""
    tracking_uri(cfg.registry)  # no registry configured: refused before the run folder is written
    paths = run_paths(cfg, run_key)
    cfg = freeze(cfg, paths, first=True)
    seconds: dict[str, float] = {}

    def timed(name: str, step: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = step(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - start, 1)
        log.info("step %s took %.1fs", name, seconds[name])
        return out

    snap = timed("load", load, cfg, paths)
    # A skipped run or a failed preflight leaves the gate to finish on its own (its report is written).
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=configure_logging)
    checked = pool.submit(validate, cfg, paths, run_key)
    try:
        skipped = timed("preflight", preflight, cfg, paths, run_key, force)
        if skipped:
            return {"run_dir": str(paths.root), "fingerprint": snap.fingerprint, "skipped": skipped,
                    "seconds": seconds}
        if cfg.eval.score_while_loaded:
            timed("champion", fetch_champion, cfg, paths)
        timed("validate", checked.result)  # the wait for the gate, once this process is done
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # the worker's own exit is not waited for
    timed("prepare", prepare, cfg, paths)
    warm = threading.Thread(target=warm_up_later_steps, name="warm-up", daemon=True)
    later = cfg.train.warm_up_later_steps and cfg.train.isolate  # training in this process leaves no time
    trained = timed("train", train, cfg, paths, run_key, opened=lambda run_id: warm.start() if later else None)
    if warm.is_alive():
        warm.join()
    if "process_s" in trained:  # of which the trainer's process (the rest: the MLflow run opened and closed)
        seconds["train process"] = trained["process_s"]
    promoted = timed("evaluate", evaluate, cfg, paths)["promote"]
    timed("register", register, cfg, paths, run_key)
    if promoted and cfg.registry.approval != "required":  # nobody here to approve: keep says how to
        result = timed("promote", promote, cfg, paths, run_key)
    else:
        result = timed("keep", keep, cfg, paths)
    return {"run_dir": str(paths.root), "fingerprint": snap.fingerprint, **result, "seconds": seconds}


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
