"""The pipeline's steps: one function per DAG task over a run folder (ml/runs.py), by stage.

    data_steps     freeze, load, preflight, validate, prepare
    train_step     train (the trainer in a supervised process of its own)
    evaluate_step  evaluate (challenger vs champion, the decision)
    release        register, promote | keep, final_decision; approval_request and record_review
                   for the DAG's approval gate; manual_move (a person's promotion or rollback)
    local          run_all: `python -m ml pipeline`, every step in one process

The Airflow DAG calls these one per task, and `python -m ml <step>` and `python -m ml pipeline`
call the same functions. Each step reads what earlier steps wrote under the run folder and writes
its own result there, so a task can be retried, or run on another worker that shares the folder,
without passing anything large through XCom. A step sequences: the work is in the domain modules,
and no step calls another.

A task is a process of its own, and a step imports the heavy stacks it uses (torch, MLflow, Great
Expectations) when it runs: a task needs only a part of them, and the CUDA worker's train step
needs neither MLflow's model flavors nor Great Expectations.
"""

from ml.pipeline.data_steps import freeze, load, preflight, prepare, validate
from ml.pipeline.evaluate_step import evaluate
from ml.pipeline.release import (
    approval_request,
    final_decision,
    keep,
    manual_move,
    promote,
    record_review,
    register,
)
from ml.pipeline.train_step import fetch_champion, train, training_command

__all__ = ["approval_request", "evaluate", "fetch_champion", "final_decision", "freeze", "keep", "load",
           "manual_move", "preflight", "prepare", "promote", "record_review", "register", "train", "training_command",
           "validate"]
