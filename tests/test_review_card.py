"""The review card a person reads on a model version: what it says, from what the run holds."""

from __future__ import annotations

from typing import Any

from ml.config import load_config
from ml.review_card import config_changes, param_value, render, row_changes


def _inputs() -> dict[str, Any]:
    decision = {"outcome": "promote", "baseline": "champion v3", "challenger_loss": 1.2345678,
                "baseline_loss": 1.3456789, "min_delta": 0.01, "rows": 42, "improvement": 0.1111, "low": 0.05,
                "high": 0.17, "confidence": 0.95, "reason": "challenger 1.2346 beats champion v3 1.3457: ...",
                "challenger_nats_per_byte": 0.41, "baseline_nats_per_byte": 0.45}
    evaluation = {"challenger": {"loss": 1.2345678, "decision_accuracy": 0.5}, "champion_version": "3",
                  "baseline": {"loss": 1.3456789, "decision_accuracy": 0.4},
                  "samples": [{"question": f"q{i} | with a pipe\nand a line", "challenger": f"new {i}",
                               "baseline": f"old {i}"} for i in range(5)]}
    snapshot = {"source": "data/x.jsonl", "rows": 500, "fingerprint": "abcdef0123456789" * 4}
    trained = {"global_step": 60, "runtime_s": 95.2, "tokens_per_s": 8824.7, "peak_gpu_gib": 11.12}
    return {"decision": decision, "evaluation": evaluation, "snapshot": snapshot, "trained": trained}


def test_the_card_says_the_decision_why_and_what_changed_since_the_champion() -> None:
    cfg = load_config("demo")
    logged = {k: param_value(v) for k, v in cfg.flat().items()}  # the champion's params, as MLflow holds them
    logged["prompt_format/instruction"] = "..."  # what its logged model added to its run: not a setting
    ours = load_config("demo", {"train.max_steps": 90, "lora.r": 8, "output_dir": "/elsewhere"}).flat()
    changes = config_changes(ours, logged)
    assert changes == [("lora.r", "16", "8"), ("train.max_steps", "60", "90")]  # booleans and lists compare as logged
    assert config_changes(cfg.flat(), logged) == [] and config_changes(ours, None) == []
    rows = row_changes({"question": ["a", "b", "c"]}, {"question": ["b", "c", "d", "e"]})
    assert rows == (1, 2)

    card = render(**_inputs(), changes=changes, rows=rows,
                  links={"Airflow run": "http://airflow.example/dags/retrain_lora/runs/r1"})
    assert card.startswith("### PROMOTED to @champion\n")
    assert "Improvement **+0.1111** nats per answer token, 95% interval [+0.0500, +0.1700] over 42 test rows" in card
    assert ("| test loss per answer token | 1.2346 | 1.3457 | improvement +0.1111 [+0.0500, +0.1700] | beyond "
            "min_delta 0.01 |") in card
    assert "| yes/no/maybe right | 50.0% | 40.0% | | |" in card  # reported, not a guardrail here
    assert "fingerprint `abcdef012345`; since champion v3: 1 training rows added, 2 removed" in card
    assert "`lora.r` 16 → 8, `train.max_steps` 60 → 90" in card and "output_dir" not in card
    assert "**Training** 60 steps in 95 s, 8,825 tokens/s, peak GPU memory 11.1 GiB." in card
    answers = [line for line in card.splitlines() if line.startswith("| q") and "question" not in line]
    assert len(answers) == 3 and answers[0] == "| q0 \\| with a pipe and a line | new 0 | old 0 |"
    assert "[Airflow run](http://airflow.example/dags/retrain_lora/runs/r1)" in card
    assert len(card.splitlines()) < 40  # a screen long


def test_a_first_version_and_a_kept_one_say_so() -> None:
    inputs = _inputs()
    inputs["decision"] = {**inputs["decision"], "outcome": "keep", "baseline": "base model"}
    inputs["evaluation"] = {**inputs["evaluation"], "champion_version": None,
                            "samples": [{"question": "q", "challenger": "a"}]}
    card = render(**inputs, changes=[], rows=None, links={})
    assert card.startswith("### Kept out: the champion stays") and "**Settings**" not in card and "since" not in card
    assert "| question | challenger |" in card and "**Links**" not in card


def test_the_card_shows_each_guardrail_beside_the_loss() -> None:
    """A small table: the loss and each guardrail, challenger vs comparator, the interval, the verdict."""
    inputs = _inputs()
    guards = [{"metric": "decision_accuracy", "verdict": "blocks", "note": "clearly worse: its whole interval is "
               "past the margin", "margin": 0.02, "challenger": 0.413, "baseline": 0.565, "change": -0.152,
               "low": -0.30, "high": -0.05, "rows": 46},
              {"metric": "degenerate_answers", "verdict": "not applicable", "margin": 0.0,
               "note": "measured on no test row of both models"}]
    inputs["decision"] = {**inputs["decision"], "outcome": "keep", "guardrails": guards}
    card = render(**inputs, changes=[], rows=None, links={})
    assert card.startswith("### Kept out: the champion stays")
    assert "| | challenger | champion v3 | change, 95% interval | verdict |" in card
    assert ("| yes/no/maybe right (guardrail, margin 2.0%) | 41.3% | 56.5% | -15.2% [-30.0%, -5.0%] over 46 rows | "
            "blocks: clearly worse: its whole interval is past the margin |") in card
    assert ("| degenerate answers (guardrail, margin 0.0%) | – | – | – | not applicable: measured on no test row "
            "of both models |") in card
    assert "| yes/no/maybe right | 50.0% |" not in card  # the guardrail's row says it


def test_a_card_awaiting_approval_says_so_and_a_reviewed_one_says_who_answered() -> None:
    inputs = _inputs()
    card = render(**inputs, changes=[], rows=None, links={}, awaiting_approval=True)
    assert card.startswith("### AWAITING APPROVAL: the rule would promote it to @champion")
    review = {"answer": "Promote", "by": "alice", "at": "2026-12-06T10:00:00+00:00", "comment": "reads well",
              "timed_out": False}
    inputs["decision"] = {**inputs["decision"], "review": review}
    card = render(**inputs, changes=[], rows=None, links={}, awaiting_approval=True)
    assert card.startswith("### PROMOTED to @champion")
    assert "**Review** approved by alice at 2026-12-06T10:00:00+00:00: reads well." in card
    inputs["decision"] = {**inputs["decision"], "outcome": "keep",
                          "review": {**review, "answer": "Keep", "by": None, "comment": "", "timed_out": True}}
    assert "**Review** no answer by 2026-12-06T10:00:00+00:00." in render(**inputs, changes=[], rows=None, links={})
