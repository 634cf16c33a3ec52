"""The registered adapter as a standard PEFT folder, and the merged 16-bit export a promotion stores
beside the version once it passed its equivalence check (ml/export.py, ml/equivalence.py): on the
tiny model through a real MLflow server and the pipeline's own promotion, on SmolLM2's real weights
through the export's functions. A corrupted merge fails the check and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from ml.config import load_config
from ml.equivalence import Check, Measurement, compare, loss_gap, token_match, within
from ml.errors import ConfigError
from ml.registry import standard_adapter
from ml.review_card import with_export

# ---------------------------------------------------------------- the check's arithmetic


def test_tokens_agree_up_to_the_first_difference_and_the_same_short_answer_agrees_in_full() -> None:
    assert token_match([[1, 2, 3]], [[1, 2, 3]], tokens=4) == 1.0  # both ended after 3: identical in full
    assert token_match([[1, 2, 3, 4]], [[1, 9, 3, 4]], tokens=4) == 0.25  # what follows a flip differs
    assert token_match([[1, 2], [5, 6, 7, 8]], [[1, 2], [5, 6, 7, 0]], tokens=4) == 7 / 8
    assert token_match([list(range(40))], [list(range(32)) + [0] * 8], tokens=32) == 1.0  # only the first 32
    with pytest.raises(ValueError, match="not the same prompts"):
        token_match([[1]], [[1], [2]])


def test_the_loss_gap_is_relative_and_over_the_rows_both_scored() -> None:
    gap, rows = loss_gap({"a": 2.0, "b": 4.0, "c": 100.0}, {"a": 2.0, "b": 4.03})
    assert rows == 2 and gap == pytest.approx(0.005)


def test_a_check_passes_only_when_the_merged_model_is_the_adapters_and_the_base_is_not() -> None:
    same = Measurement({"a": 2.0, "b": 3.0}, [[1, 2, 3]])
    close = Measurement({"a": 2.001, "b": 3.0}, [[1, 2, 3]])
    far = Measurement({"a": 2.5, "b": 3.0}, [[1, 2, 3]])
    other_tokens = Measurement({"a": 2.0, "b": 3.0}, [[1, 7, 3]])
    assert within(compare(same, close)) and not within(compare(same, far))
    assert not within(compare(same, other_tokens))
    assert Check(compare(same, close), compare(same, far)).passed
    assert Check(compare(same, close), compare(same, other_tokens)).passed  # the base answers otherwise
    failed = Check(compare(same, far), compare(same, far))
    assert not failed.passed and "is not the adapter model" in failed.reason
    no_op = Check(compare(same, same), compare(same, close))  # the base is the adapter model: proves nothing
    assert not no_op.passed and "not measurably different from the bare base" in no_op.reason


def test_the_review_cards_export_paragraph_comes_before_the_commands_and_is_replaced() -> None:
    card = "Promoted: ...\n\n> why\n\n**Undo or override** ...:\n\n```bash\nx\n```\n"
    tags = {"export": "runs:/r1/merged_model", "export_dtype": "bfloat16", "export_loss_gap": "0.000019",
            "export_token_match": "1.0000", "export_base_loss_gap": "0.108", "export_base_token_match": "0.0",
            "export_rows": "8", "export_prompts": "8", "export_check": "passed (limits ...)"}
    once = with_export(card, tags)
    assert once.index("**Export** merged bfloat16 model `runs:/r1/merged_model`") < once.index("**Undo")
    assert "0.002% apart, 100.0% of the greedy tokens identical; the bare base model 10.800%" in once
    pruned = with_export(once, {"export_pruned": "2026-12-07T00:00:00+00:00 by alice"})
    assert pruned.count("**Export**") == 1 and "**Export** pruned 2026-12-07" in pruned
    assert with_export(pruned, {}) == card  # no export, no paragraph


def test_the_registered_adapter_records_its_bases_revision(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base", "revision": None}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    assert standard_adapter(adapter, None, tmp_path / "tmp") == adapter  # nothing to add: the folder itself
    copy = standard_adapter(adapter, "abc123", tmp_path / "tmp")
    assert json.loads((copy / "adapter_config.json").read_text()) == {"base_model_name_or_path": "org/base",
                                                                     "revision": "abc123"}
    assert (copy / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads((adapter / "adapter_config.json").read_text())["revision"] is None  # the evaluated one stays


def test_a_required_export_needs_exports_on_promotion() -> None:
    with pytest.raises(ConfigError, match="registry.require_export needs registry.export_on_promotion"):
        load_config("e2e", {"registry.require_export": True, "registry.export_on_promotion": False})


# ---------------------------------------------------------------- the tiny model through MLflow

NAME = "export-e2e"


@pytest.fixture(scope="module")
def two_versions(module_tracking: str, evaluated_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(config, client): two versions of the session's evaluated run (copies of its folder, registered
    under two run keys), version 1 promoted by the pipeline's promote step (and so exported), version 2
    registered and not promoted."""
    from mlflow import MlflowClient

    from ml import pipeline
    from ml.runs import RunPaths

    runs = tmp_path_factory.mktemp("export") / "runs"
    cfg = load_config("e2e", {"registry.model_name": NAME, "registry.export_on_promotion": True,
                              "output_dir": str(runs)})
    for key in ("first", "second"):
        paths = RunPaths(runs / key)
        shutil.copytree(evaluated_run[1].root, paths.root)
        assert pipeline.register(cfg, paths, key)["version"] == {"first": "1", "second": "2"}[key]
        if key == "first":
            assert pipeline.promote(cfg, paths, key)["promoted"]
    return cfg, MlflowClient(module_tracking)


def _ml(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ml", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.slow
def test_a_promotion_stores_a_merged_16_bit_model_that_plain_transformers_loads(two_versions: Any,
                                                                               tmp_path: Path) -> None:
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, client = two_versions
    mv = client.get_model_version(NAME, "1")
    assert mv.aliases == ["champion"] and mv.tags["export"] == f"runs:/{mv.run_id}/merged_model"
    assert float(mv.tags["export_loss_gap"]) <= 0.005 and float(mv.tags["export_token_match"]) >= 0.99
    assert float(mv.tags["export_base_loss_gap"]) > 0.005  # the adapter is not a no-op: the check could fail
    assert mv.tags["export_dtype"] == "bfloat16" and "export_quantized_base" not in mv.tags
    assert "**Export** merged bfloat16 model `runs:/" in mv.description
    folder = Path(mlflow.artifacts.download_artifacts(mv.tags["export"], dst_path=str(tmp_path)))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "export.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    about = json.loads((folder / "export.json").read_text())
    assert about["version"] == "1" and about["check"]["passed"] and about["adapter_sha256"] == mv.tags["adapter_sha256"]

    # the served model answers as the registered pyfunc's adapter model, and unlike the bare base
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1").unwrap_python_model()
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == pyfunc.tokenizer.eos_token
    ids = tokenizer("폐암 환자에서 면역항암제 치료는 생존을 늘리는가?")["input_ids"]
    assert ids == pyfunc.tokenizer("폐암 환자에서 면역항암제 치료는 생존을 늘리는가?")["input_ids"]
    adapter = _logits(pyfunc.model, ids)
    with pyfunc.model.disable_adapter():
        base = _logits(pyfunc.model, ids)
    gap, effect = (_logits(merged, ids) - adapter).abs().max(), (base - adapter).abs().max()
    assert gap < 0.05 * effect, (float(gap), float(effect))


NO_PROJECT = """
import importlib.abc, json, sys
class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ml" or name.startswith("ml."):
            raise ImportError(f"project code: {name}")
sys.meta_path.insert(0, NoProject())
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, ids, out = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor([json.loads(ids)])).logits[0], out)
conf = model.peft_config["default"]
print(json.dumps({"base": conf.base_model_name_or_path, "revision": conf.revision,
                  "project": sorted(m for m in sys.modules if m == "ml" or m.startswith("ml."))}))
"""


@pytest.mark.slow
def test_the_registered_adapter_loads_with_peft_alone_and_gives_the_pyfuncs_logits(two_versions: Any,
                                                                                  tmp_path: Path) -> None:
    import mlflow
    import torch

    from ml.registry import download_version

    cfg, client = two_versions
    got = download_version(client, cfg.registry, "1", tmp_path / "v1")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in got.adapter_dir.iterdir()}
    assert got.base_path is not None  # the tiny base travels with the version
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1").unwrap_python_model()
    ids = pyfunc.tokenizer("재발성 요로감염 여성에서 크랜베리 추출물은 재발을 예방하는가?")["input_ids"]
    out = subprocess.run([sys.executable, "-c", NO_PROJECT, str(got.base_path), str(got.adapter_dir), json.dumps(ids),
                          str(tmp_path / "logits.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-3000:]
    said = json.loads(out.stdout.strip().splitlines()[-1])
    assert said == {"base": str(cfg.model.base_model), "revision": None, "project": []}, said
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _logits(pyfunc.model, ids))


def _corrupting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every merge from now on writes its model with one tensor perturbed; returns the tensors hit."""
    import torch
    from safetensors.torch import load_file, save_file

    from ml import export

    real, hit = export.merge, []

    def merge(model_cfg: Any, adapter_dir: Path, out: Path) -> dict[str, Any]:
        made = real(model_cfg, adapter_dir, out)
        tensors = load_file(out / "model.safetensors")
        name = "model.layers.0.mlp.down_proj.weight"
        t = tensors[name].float()
        tensors[name] = (t + torch.randn_like(t) * t.std() * 10).to(tensors[name].dtype)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        hit.append(name)
        return made

    monkeypatch.setattr(export, "merge", merge)
    return hit


@pytest.mark.slow
def test_a_corrupted_merge_fails_the_check_records_nothing_and_blocks_a_required_promotion(
        two_versions: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ml import pipeline
    from ml.errors import ExportFailed
    from ml.export import export_version

    cfg, client = two_versions
    before = client.get_model_version(NAME, "2")
    hit = _corrupting(monkeypatch)
    with pytest.raises(ExportFailed, match="is not the adapter model that was evaluated") as failed:
        export_version(client, cfg, "2")
    assert hit and "was not recorded" in str(failed.value)
    after = client.get_model_version(NAME, "2")
    assert after.tags == before.tags and after.description == before.description  # no tag, no card line
    assert client.list_artifacts(after.run_id, "merged_model") == []  # no file
    assert not list(Path(cfg.output_dir).glob(".export-*"))  # nor a work folder left behind

    required = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"require_export": True})})
    with pytest.raises(ExportFailed):
        pipeline.manual_move(required, "2", "reviewed, but its merged model is broken")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"  # the alias did not move
    assert client.get_model_version(NAME, "2").tags == before.tags and len(hit) == 2


@pytest.mark.slow
def test_the_export_command_records_a_version_and_prune_deletes_only_exports_without_an_alias(
        two_versions: Any) -> None:
    from ml.registry import prune_exports

    cfg, client = two_versions
    common = ("--profile", "e2e", "--set", f"registry.model_name={NAME}", "--set", f"output_dir={cfg.output_dir}")
    out = _ml("export", *common, "--version", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["export"] == client.get_model_version(NAME, "2").tags["export"]
    listed = prune_exports(client, cfg.registry, delete=False)  # a dry run: lists, deletes nothing
    assert [item["version"] for item in listed] == ["2"]  # version 1 holds @champion
    run_2 = client.get_model_version(NAME, "2").run_id
    assert client.list_artifacts(run_2, "merged_model")
    out = _ml("prune-exports", *common, "--yes")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [item["version"] for item in json.loads(out.stdout)["deleted"]] == ["2"]
    v2 = client.get_model_version(NAME, "2")
    assert "export" not in v2.tags and v2.tags["export_pruned"] and "**Export** pruned" in v2.description
    assert client.list_artifacts(run_2, "merged_model") == []
    v1 = client.get_model_version(NAME, "1")
    assert client.list_artifacts(v1.run_id, "merged_model") and "export" in v1.tags  # the champion's stays
    assert prune_exports(client, cfg.registry, delete=False) == []


# ---------------------------------------------------------------- SmolLM2's real weights


@pytest.mark.slow
def test_smollm2_merged_reloads_with_plain_transformers_and_passes_the_check(smollm2: Path, tmp_path: Path) -> None:
    """A LoRA adapter with non-zero weights on SmolLM2-135M-Instruct (tied embeddings, real weights),
    merged, written, reloaded from its files: the same model as the adapter one, and not the base."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ml.export import make
    from ml.modeling import lora_config
    from ml.prompt import PromptFormat
    from ml.sources import load_examples

    cfg = load_config("smollm2-pubmedqa-en", {"model.base_model": str(smollm2)})
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(cfg, base.config.num_hidden_layers))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as training leaves it: B no longer zero
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(tmp_path / "adapter")
    fmt = PromptFormat.from_config(cfg)
    # the shortest rows: three models score them on two CPU cores (a 1,000-token row takes seconds)
    test = sorted(load_examples(cfg.data)[:200], key=lambda ex: len(ex.question) + sum(map(len, ex.contexts))
                  + len(ex.answer))[:4]
    made = make(cfg.model, tmp_path / "adapter", test, fmt, 2, 8, tmp_path / "merged")
    print(made.check.reason)
    assert made.check.passed, made.check.reason
    assert made.check.base.loss_gap > 0.005 or made.check.base.token_match < 0.99
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.config.tie_word_embeddings and merged.dtype == torch.float32
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template
