"""A registered version as serving engines load it: its adapter merged into a 16-bit copy of its base
model, checked against the adapter model before it is recorded.

The registry holds each version as a standard PEFT adapter (ml/registry.py) beside a reference to
its base. vLLM, TGI, llama.cpp and plain transformers also load a merged model: `export_version`
writes one (safetensors shards, tokenizer, chat template, generation config, `export.json`), from
the version as registered. A 4-bit base is dequantized to 16 bits first and the adapter merged into
that: merging into the 4-bit layers would quantize the sum again, the usual way merged models stop
answering as their adapter did. The merged model, reloaded from its files with plain transformers,
is then measured against the adapter model as the evaluation loads it, on the version's frozen test
rows (ml/equivalence.py). Only an export that passes is stored beside the version (its run's
`merged_model/` artifacts) and tagged with its numbers; a failed one records nothing.

`for_promotion` is what a promotion runs (the pipeline's, a person's, a rollback): it exports the
version about to become champion unless it has an export already; `registry.require_export` decides
whether a failure stops the promotion.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel

from ml.config import ModelConfig, PipelineConfig, resolve_path
from ml.data import QAExample, read_split
from ml.equivalence import CONTINUATION_TOKENS, LOSS_TOLERANCE, TOKEN_MATCH, Check, compare, measure, prompts
from ml.errors import ExportFailed
from ml.modeling import compute_dtype, load_base_model, load_tokenizer, load_with_adapter
from ml.prompt import PromptFormat

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

METADATA_FILE = "export.json"  # in the merged folder: what it is, how it was made, its check
SHARD_SIZE = "5GB"  # safetensors shards of the size the hub's checkpoints use


def export_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The merged model's precision: the evaluation's where it computes in 16 bits (bfloat16 on a GPU
    that has it), else bfloat16 (a CPU's float32 evaluation: engines serve 16-bit models)."""
    dtype = compute_dtype(model_cfg)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def quantization(model: Any) -> str | None:
    """How a loaded base model is quantized (`bitsandbytes nf4`), or None for full precision."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    qc = quantizer.quantization_config
    method = str(getattr(qc.quant_method, "value", qc.quant_method))
    kind = getattr(qc, "bnb_4bit_quant_type", None) if getattr(qc, "load_in_4bit", False) else None
    return f"{method} {kind}" if kind else method


def merge(model_cfg: ModelConfig, adapter_dir: Path, out: Path) -> dict[str, Any]:
    """Write the base model with the adapter merged in to `out`, in 16 bits (`export_dtype`), with the
    adapter's tokenizer (its chat template) and the base's generation config; a 4-bit base is
    dequantized to that precision first. Returns what was done, for the metadata."""
    dtype = export_dtype(model_cfg)
    base = load_base_model(model_cfg)
    quantized = quantization(base)
    if quantized:  # the adapter was trained and evaluated on these dequantized weights
        log.info("dequantizing the %s base model to %s before merging", quantized, dtype)
        base = base.dequantize(dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True).to(dtype)
    partial = out.with_name(out.name + ".partial")  # a crash leaves no folder under the real name
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size=SHARD_SIZE)
    load_tokenizer(model_cfg, str(adapter_dir)).save_pretrained(partial)
    config = json.loads((partial / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise ExportFailed(f"the merged model in {partial} still says it is quantized: {config['quantization_config']}")
    del model, base
    _free()
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return {"dtype": str(dtype).removeprefix("torch."), "quantized_base": quantized,
            "merge": "peft merge_and_unload(safe_merge=True)" + (f", dequantized to {dtype} first" if quantized
                                                                  else ""),
            "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def load_merged(model_cfg: ModelConfig, folder: Path) -> tuple[Any, Any]:
    """The merged model as a server loads it: plain transformers, from its own files (its own
    tokenizer), computing in the evaluation's precision on the evaluation's device."""
    cfg = model_cfg.model_copy(update={"base_model": str(folder), "revision": None, "load_in_4bit": False})
    model = load_base_model(cfg)
    model.eval()
    return model, load_tokenizer(cfg)


@dataclass(frozen=True)
class Made:
    """An export written to `folder` (not recorded yet) and its check."""
    folder: Path
    check: Check
    about: dict[str, Any]  # export.json


def make(model_cfg: ModelConfig, adapter_dir: Path, test: list[QAExample], fmt: PromptFormat, n_prompts: int,
         batch_size: int, out: Path, about: dict[str, Any] | None = None) -> Made:
    """Measure the adapter model (and the bare base: the adapter switched off) as the evaluation
    loads it, merge (`merge`), reload the merged model from its files and measure it the same way;
    write `export.json` in `out` with the check. One model in memory at a time."""
    start = time.perf_counter()
    model, tokenizer = load_with_adapter(model_cfg, adapter_dir)
    asked = prompts(tokenizer, test, fmt, n_prompts)
    if not asked:
        raise ExportFailed(f"no test row leaves room for a {CONTINUATION_TOKENS}-token continuation within "
                           f"{fmt.max_length} tokens: nothing to compare the merged model on")
    reference = measure(model, tokenizer, test, asked, fmt, batch_size)
    with model.disable_adapter():
        bare = measure(model, tokenizer, test, asked, fmt, batch_size)
    del model
    _free()
    made = merge(model_cfg, adapter_dir, out)
    merged_model, merged_tok = load_merged(model_cfg, out)
    merged = measure(merged_model, merged_tok, test, asked, fmt, batch_size)
    del merged_model
    _free()
    check = Check(compare(reference, merged), compare(reference, bare))
    record = {"base_model": model_cfg.base_model, "revision": model_cfg.revision, **(about or {}), **made,
              "check": check.to_dict(), "seconds": round(time.perf_counter() - start, 1),
              "made_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "packages": {p: _version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}}
    (out / METADATA_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("export check %s", check.reason)
    return Made(out, check, record)


def check_tags(made: Made) -> dict[str, str]:
    """The version's tags for a passed export (with `export`, the URI, that ml/registry.py adds)."""
    m, b = made.check.merged, made.check.base
    tags = {"export_check": f"passed (limits: loss {LOSS_TOLERANCE:.1%} apart, {TOKEN_MATCH:.0%} of the first "
                            f"{CONTINUATION_TOKENS} greedy tokens identical)",
            "export_dtype": made.about["dtype"], "export_loss_gap": f"{m.loss_gap:.6f}",
            "export_token_match": f"{m.token_match:.4f}", "export_base_loss_gap": f"{b.loss_gap:.6f}",
            "export_base_token_match": f"{b.token_match:.4f}", "export_rows": str(m.rows),
            "export_prompts": str(m.prompts)}
    if made.about.get("quantized_base"):
        tags["export_quantized_base"] = made.about["quantized_base"]
    return tags


def export_version(client: MlflowClient, cfg: PipelineConfig, version: str,
                   test: list[QAExample] | None = None) -> dict[str, Any]:
    """Export registered version `version` (`make`) and, if its check passes, store it beside the
    version and tag it (ml/registry.py). `test`: its test rows (the run folder's), else its run's.
    A failed check raises ExportFailed and records nothing."""
    from ml import registry  # MLflow

    reg = cfg.registry
    root = resolve_path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".export-{reg.model_name}-v{version}-", dir=root))  # beside the runs: room
    try:
        got = registry.download_version(client, reg, version, work / "version")
        if test is None:
            test = _test_rows(client, cfg, got, work / "run")
        conf = got.model_config
        fmt = PromptFormat(**conf["prompt_format"])
        model_cfg = ModelConfig(base_model=str(got.base_path) if got.base_path else conf["base_model"],
                                revision=conf.get("revision"), load_in_4bit=bool(conf.get("load_in_4bit", True)),
                                dtype=conf.get("dtype", "auto"), max_seq_length=fmt.max_length)
        about = {"model_name": reg.model_name, "version": version, "run_id": got.run_id,
                 "base_model": conf["base_model"], "adapter_sha256": got.tags.get("adapter_sha256")}
        made = make(model_cfg, got.adapter_dir, test, fmt, reg.export_prompts, cfg.eval.batch_size,
                    work / registry.EXPORT_ARTIFACT, about)
        if not made.check.passed:
            raise ExportFailed(f"version {version}'s merged model was not recorded: {made.check.reason}")
        uri = registry.record_export(client, reg, version, made.folder, check_tags(made))
        return {"version": version, "export": uri, "check": made.check.reason, "dtype": made.about["dtype"],
                "gib": round(made.about["bytes"] / 2**30, 3), "seconds": made.about["seconds"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def for_promotion(client: MlflowClient, cfg: PipelineConfig, version: str,
                  test: list[QAExample] | None = None) -> dict[str, Any] | None:
    """The export of a version about to become champion (`registry.export_on_promotion`): the one it
    has, else a new one. A failure stops the promotion where `registry.require_export` says so (it is
    raised), else it is logged and the promotion goes on without an export."""
    from ml import registry  # MLflow

    reg = cfg.registry
    if not reg.export_on_promotion:
        return None
    uri = registry.recorded_export(client, reg, version)
    if uri:
        log.info("version %s already has its export %s", version, uri)
        return {"version": version, "export": uri}
    try:
        return export_version(client, cfg, version, test)
    except Exception as exc:
        if reg.require_export:
            raise
        log.warning("version %s becomes champion without an export (registry.require_export is off): %s: %s",
                    version, type(exc).__name__, exc, exc_info=not isinstance(exc, ExportFailed))
        return None


def _test_rows(client: MlflowClient, cfg: PipelineConfig, got: Any, dst: Path) -> list[QAExample]:
    """The version's frozen test rows: logged in its run, else (a version registered before they were)
    its run folder's, found by its run key."""
    from ml import registry  # MLflow
    from ml.runs import run_paths
    from ml.tracking import RUN_KEY_TAG, TEST_SPLIT_ARTIFACT

    logged = registry.test_split(client, got.run_id, dst)
    if logged is not None:
        return read_split(logged.parent, "test")
    key = got.tags.get(RUN_KEY_TAG)
    folder = run_paths(cfg, key).splits if key else None
    if folder is None or not (folder / "test.jsonl").exists():
        raise ExportFailed(f"version {got.version}'s test rows are neither in its run ({TEST_SPLIT_ARTIFACT}) "
                           f"nor in a run folder here ({folder}): nothing to check an export on")
    return read_split(folder, "test")


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
