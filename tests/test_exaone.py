"""EXAONE-3.5 checkpoints load without their remote code: converted to Llama's layout, checked
against a plain forward pass written from EXAONE's own layout, and run through the EXAONE
profile's train, evaluate and pyfunc reload on a small random checkpoint of that layout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ml import pipeline
from ml.base_models import resolve
from ml.config import load_config
from ml.errors import ModelLoadError
from ml.modeling import lora_config
from ml.runs import read_json, run_paths
from ml.tiny import ExaoneShape, exaone_checkpoint

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 2, 64, 4, 2, 16, 128
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}
TINY = ExaoneShape(hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, ffn=FFN,
                   max_positions=1024, rope_scaling=ROPE)


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """EXAONE's forward pass from its own weights and config, written out by hand."""
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(folder / "model.safetensors")
    eps, theta, rope = cfg["layer_norm_epsilon"], cfg["rope_theta"], cfg["rope_scaling"]

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    # rotary frequencies with Llama-3's long-context scaling
    inv = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    low, high = (rope["original_max_position_embeddings"] / rope[k] for k in ("low_freq_factor", "high_freq_factor"))
    wavelen = 2 * math.pi / inv
    smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
        rope["high_freq_factor"] - rope["low_freq_factor"])
    scaled = torch.where(wavelen > low, inv / rope["factor"], inv)
    middle = (wavelen <= low) & (wavelen >= high)
    inv = torch.where(middle, (1 - smooth) * inv / rope["factor"] + smooth * inv, scaled)
    angles = torch.arange(ids.shape[1]).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:  # (batch, heads, seq, dim), rotate-half layout
        half = torch.cat([-x[..., HEAD_DIM // 2:], x[..., :HEAD_DIM // 2]], -1)
        return x * cos + half * sin

    x = w["transformer.wte.weight"][ids]
    seq = ids.shape[1]
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.h.{i}."
        h = rms(x, w[p + "ln_1.weight"])
        q, k, v = (h @ w[p + f"attn.attention.{n}_proj.weight"].T for n in "qkv")
        q = q.view(1, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (t.view(1, seq, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
                for t in (k, v))
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(HEAD_DIM) + causal
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, seq, HEADS * HEAD_DIM)
        x = x + att @ w[p + "attn.attention.out_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        gate, up = h @ w[p + "mlp.c_fc_0.weight"].T, h @ w[p + "mlp.c_fc_1.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.c_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"]) @ w["transformer.wte.weight"].T  # tied head


@pytest.fixture(scope="module")
def exaone(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exaone_checkpoint(tmp_path_factory.mktemp("exaone") / "EXAONE-3.5-tiny", tiny_model, TINY)


def test_the_converted_model_computes_exaones_forward_without_its_remote_code(exaone: Path) -> None:
    folder = Path(resolve(str(exaone)))
    assert folder == exaone.with_name(exaone.name + ".llama") and not (folder / "modeling_exaone.py").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and config["num_hidden_layers"] == LAYERS
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    ids = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    # 96 tokens pass the 64 of the scaled RoPE's original context: the scaling is exercised too
    torch.testing.assert_close(ours, reference_logits(exaone, ids), rtol=1e-4, atol=1e-4)
    assert resolve(str(exaone)) == str(folder)  # converted once, then reused


def test_a_hub_exaone_checkpoint_is_fetched_and_converted_once(
        exaone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is out of reach here: its two downloads are stood in for by the local checkpoint."""
    from ml import base_models

    fetched: list[tuple[str, str | None]] = []
    monkeypatch.setattr(base_models, "MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(base_models, "hf_hub_download", lambda repo, name, revision: str(exaone / name))

    def snapshot(repo: str, revision: str | None, allow_patterns: list[str]) -> str:
        fetched.append((repo, revision))
        return str(exaone)

    monkeypatch.setattr(base_models, "snapshot_download", snapshot)
    folder = Path(resolve("LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", "abc123"))
    assert folder == tmp_path / "models" / "converted" / "LGAI-EXAONE--EXAONE-3.5-2.4B-Instruct@abc123"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert fetched == [("LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", "abc123")]


def test_a_checkpoint_that_is_not_exaone_35_is_refused_naming_the_weight(exaone: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd-exaone"
    shutil.copytree(exaone, odd)
    weights = load_file(odd / "model.safetensors")
    fused = weights.pop("transformer.h.0.attn.attention.q_proj.weight")
    weights["transformer.h.0.attn.attention.qkv_fused.weight"] = fused
    save_file(weights, odd / "model.safetensors")
    with pytest.raises(ModelLoadError, match="transformer.h.0.attn.attention.qkv_fused.weight"):
        resolve(str(odd))
    assert not odd.with_name("odd-exaone.llama").exists()


def _exaone_run(root: Path, exaone: Path, key: str, **overrides: Any) -> tuple[Any, Any]:
    cfg = load_config("exaone-3.5-2.4b", {
        "model.base_model": str(exaone), "data.source": str(Path(__file__).parent.parent / "data" / "sample"
                                                                 / "pubmedqa_ko_sample.jsonl"),
        "data.id_column": "PMID", "validation.min_rows": 50, "train.num_train_epochs": 1, "output_dir": str(root),
        "eval.num_sample_generations": 1, "eval.max_new_tokens": 6, "registry.experiment": "exaone",
        "registry.min_rows": 5,  # the sample's test split: 8 rows
        "registry.model_name": f"exaone-tiny-{key}", "registry.artifact_location": str(root / "mlartifacts"),
        **overrides})
    paths = run_paths(cfg, key)
    for step in (pipeline.load, pipeline.validate, pipeline.prepare, pipeline.train, pipeline.evaluate):
        step(cfg, paths)
    pipeline.register(cfg, paths, key)
    promoted = read_json(paths.evaluation)["decision"]["outcome"] == "promote"
    (pipeline.promote if promoted else pipeline.keep)(cfg, paths)
    return cfg, paths


def test_the_exaone_profile_trains_evaluates_and_reloads_as_a_pyfunc(
        exaone: Path, module_tracking: str, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    cfg, paths = _exaone_run(tmp_path, exaone, "full", **{"train.learning_rate": 1e-3})
    t = cfg.train  # the profile's settings, but one epoch
    assert (t.per_device_train_batch_size, t.learning_rate, t.optim, t.warmup_ratio) == (1, 1e-3, "adamw_torch", 0.1)
    adapter = json.loads((paths.train / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    evaluation = read_json(paths.evaluation)
    assert evaluation["challenger"]["loss"] < evaluation["baseline"]["loss"], evaluation["decision"]["reason"]
    version = read_json(paths.registered)["version"]
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}/{version}")
    answers = model.predict(pd.DataFrame([{"QUESTION": "금연은 폐 기능을 개선하는가?", "CONTEXTS": ["코호트 연구."]}]),
                            params={"max_new_tokens": 4})
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_the_top_layers_and_lm_head_scope_on_both_profiles(exaone: Path, module_tracking: str, tmp_path: Path) -> None:
    for profile, layers in (("pubmedqa-ko-llama31-8b", 32), ("exaone-3.5-2.4b", 30)):
        scoped = lora_config(load_config(profile, {"lora.top_k_layers": 7, "lora.train_lm_head": True}), layers)
        assert scoped.layers_to_transform == list(range(layers - 7, layers)) and scoped.modules_to_save == ["lm_head"]
    _, paths = _exaone_run(tmp_path, exaone, "scoped", **{"train.max_steps": 3, "lora.top_k_layers": 1,
                                                           "lora.train_lm_head": True})
    saved = load_file(paths.train / "adapter" / "adapter_model.safetensors")
    lora_layers = {int(k.split(".layers.")[1].split(".")[0]) for k in saved if "lora_" in k}
    assert lora_layers == {LAYERS - 1} and any("lm_head" in k for k in saved)
