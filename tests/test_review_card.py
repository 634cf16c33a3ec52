"""The review card a person reads on a model version: what it says, from what the run holds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import trained_run

from ml.config import load_config
from ml.review_card import commands, config_changes, param_value, render, row_changes

# A bare `@word` outside a code span: MLflow's markdown links it to a GitHub user.
BARE_MENTION = re.compile(r"(?<![\w@`])@[A-Za-z0-9_]")


def bare_mentions(card: str) -> list[str]:
    text = re.sub(r"```.*?```", "", card, flags=re.S)  # code blocks
    text = re.sub(r"`[^`]*`", "", text)  # code spans
    return BARE_MENTION.findall(text)


def _inputs() -> dict[str, Any]:
    decision = {"outcome": "promote", "baseline": "champion v3", "challenger_loss": 1.2345678,
                "baseline_loss": 1.3456789, "min_delta": 0.01, "rows": 42, "improvement": 0.1111, "low": 0.05,
                "high": 0.17, "confidence": 0.95, "reason": "challenger 1.2346 beats champion v3 1.3457: ...",
                "challenger_nats_per_byte": 0.41, "baseline_nats_per_byte": 0.45}
    evaluation = {"challenger": {"loss": 1.2345678, "decision_accuracy": 0.5}, "champion_version": "3",
                  "baseline": {"loss": 1.3456789, "decision_accuracy": 0.4},
                  "samples": [{"question": f"q{i} | with a pipe\nand a line", "reference": f"ref {i}",
                               "challenger": f"new {i}", "baseline": f"old {i}"} for i in range(5)]}
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
    assert card.startswith("Promoted: test loss 1.2346 vs 1.3457 of champion v3, improvement "
                           "+0.1111 (95% interval +0.0500 to +0.1700; promotion needs more than 0.01).\n\n")
    assert card.count(_inputs()["decision"]["reason"]) == 1 and not bare_mentions(card)
    assert ("| test loss per answer token | 1.2346 | 1.3457 | improvement +0.1111 [+0.0500, +0.1700] | beyond "
            "min_delta 0.01 |") in card
    assert "| yes/no/maybe right | 50.0% | 40.0% | | |" in card  # reported, not a guardrail here
    assert "fingerprint `abcdef012345`; since champion v3: 1 training rows added, 2 removed" in card
    assert "`lora.r` 16 → 8, `train.max_steps` 60 → 90" in card and "output_dir" not in card
    assert "**Training** 60 steps in 95 s, 8,825 tokens/s, peak GPU memory 11.1 GiB." in card
    assert "| question | reference | challenger | champion v3 |" in card
    answers = [line for line in card.splitlines() if line.startswith("| q") and "question" not in line]
    assert len(answers) == 3 and answers[0] == "| q0 \\| with a pipe and a line | ref 0 | new 0 | old 0 |"
    assert "[Airflow run](http://airflow.example/dags/retrain_lora/runs/r1)" in card
    assert len(card.splitlines()) < 40  # a screen long


def test_a_first_version_and_a_kept_one_say_so() -> None:
    inputs = _inputs()
    inputs["decision"] = {**inputs["decision"], "outcome": "keep", "baseline": "base model"}
    inputs["evaluation"] = {**inputs["evaluation"], "champion_version": None,
                            "samples": [{"question": "q", "reference": "r", "challenger": "a", "baseline": ""}]}
    card = render(**inputs, changes=[], rows=None, links={})
    assert card.startswith("Kept out: test loss 1.2346 vs 1.3457 of base model")
    assert "**Settings**" not in card and "since" not in card and "**Links**" not in card
    # the base model's answer has its column, an empty one said so
    assert "| question | reference | challenger | base model |\n| --- | --- | --- | --- |\n| q | r | a | " \
           "*(empty answer)* |" in card


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
    assert card.startswith("Kept out by the guardrail yes/no/maybe right: test loss")
    assert "| | challenger | champion v3 | change, 95% interval | verdict |" in card
    assert ("| yes/no/maybe right (guardrail, margin 2.0%) | 41.3% | 56.5% | -15.2% [-30.0%, -5.0%] over 46 rows | "
            "blocks: clearly worse: its whole interval is past the margin |") in card
    assert ("| degenerate answers (guardrail, margin 0.0%) | – | – | – | not applicable: measured on no test row "
            "of both models |") in card
    assert "| yes/no/maybe right | 50.0% |" not in card  # the guardrail's row says it


def test_a_card_awaiting_approval_says_so_and_a_reviewed_one_says_who_answered() -> None:
    inputs = _inputs()
    card = render(**inputs, changes=[], rows=None, links={}, awaiting_approval=True)
    assert card.startswith("Awaiting approval: test loss 1.2346 vs 1.3457")
    review = {"answer": "Promote", "by": "alice", "at": "2026-12-06T10:00:00+00:00", "comment": "reads well",
              "timed_out": False}
    inputs["decision"] = {**inputs["decision"], "review": review}
    card = render(**inputs, changes=[], rows=None, links={}, awaiting_approval=True)
    assert card.startswith("Promoted: ")
    assert "**Review** approved by alice at 2026-12-06T10:00:00+00:00: reads well." in card
    inputs["decision"] = {**inputs["decision"], "outcome": "keep",
                          "review": {**review, "answer": "Keep", "by": None, "comment": "", "timed_out": True}}
    card = render(**inputs, changes=[], rows=None, links={})
    assert card.startswith("Kept out, no answer to the approval request: ")
    assert "**Review** no answer by 2026-12-06T10:00:00+00:00." in card


def test_no_alias_or_name_becomes_a_mention_link() -> None:
    """`@champion` in a reason (a person moved the alias), a comment or an answer is a code span, an
    e-mail address stays an address; the first line holds no markup at all."""
    inputs = _inputs()
    reason = ("NEEDS REVIEW: @champion was moved by hand (alice) to v4 after this run was evaluated against "
              "champion v3; a person's choice is not overridden. Scores then: ...")
    inputs["decision"] = {**inputs["decision"], "outcome": "needs_review", "reason": reason,
                          "review": {"answer": "Keep", "by": "bob", "at": "now", "timed_out": False,
                                     "comment": "ask @carol, or mail carol@example.org; `@champion` stays"}}
    inputs["evaluation"]["samples"][0]["challenger"] = "@previous_champion says hi"
    card = render(**inputs, changes=[], rows=None, links={})
    first = card.splitlines()[0]
    assert first == ("Needs review (champion was moved by hand (alice) to v4 after this run was "
                     "evaluated against champion v3): test loss 1.2346 vs 1.3457 of champion v3, improvement +0.1111 "
                     "(95% interval +0.0500 to +0.1700; promotion needs more than 0.01).")
    assert not re.search(r"[`*#|@\[]", first) and not bare_mentions(card)
    assert "`@champion` was moved by hand" in card and "ask `@carol`, or mail carol@example.org" in card
    assert "`@previous_champion` says hi" in card


def test_the_card_ends_with_the_rollback_and_promote_commands_of_its_registry() -> None:
    undo = commands("http://user:secret@mlflow.example:5000", "demo", "7", {"registry.model_name": "my model"})
    assert undo == ["export MLFLOW_TRACKING_URI='http://***@mlflow.example:5000'",
                    "python -m ml rollback --profile demo --set 'registry.model_name=my model' --reason \"...\"",
                    "python -m ml promote --profile demo --set 'registry.model_name=my model' --version 7 "
                    "--reason \"...\""]
    card = render(**_inputs(), changes=[], rows=None, links={"MLflow run": "http://m/#/runs/1"},
                  undo=commands("sqlite:///state/demo/mlflow/mlflow.db", "demo", "7"))
    block = card.split("```bash\n")[1].split("```")[0].splitlines()
    assert block == ["export MLFLOW_TRACKING_URI=sqlite:///state/demo/mlflow/mlflow.db",
                     'python -m ml rollback --profile demo --reason "..."',
                     'python -m ml promote --profile demo --version 7 --reason "..."']
    assert "secret" not in "".join(undo)


@pytest.fixture(scope="module")
def registered_card(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[str, Any, dict[str, str], str]:
    """A real run of the tiny model against the bare base model (no champion yet): trained, scored,
    judged and registered by the product's own steps in a SQLite registry; the version's description."""
    from mlflow import MlflowClient

    from ml import pipeline

    tmp = tmp_path_factory.mktemp("card")
    cfg, paths, _ = trained_run(tmp, **{"train.max_steps": 5})  # real records; the numbers do not matter here
    pipeline.evaluate(cfg, paths)
    registered = pipeline.register(cfg, paths, "card-run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    card = MlflowClient(uri).get_model_version(cfg.registry.model_name, registered["version"]).description
    return card, paths, registered, uri


def test_a_registered_cards_start_answers_reason_and_commands(
        registered_card: tuple[str, Any, dict[str, str], str]) -> None:
    from ml.runs import read_json

    card, paths, registered, uri = registered_card
    decision = read_json(paths.evaluation)["decision"]
    lines = card.splitlines()
    assert re.fullmatch(r"(Promoted|Kept out|Needs review \(.+\)): "
                        r"test loss \d\.\d{4} vs \d\.\d{4} of base model.*\.", lines[0]), lines[0]
    assert lines[1] == "" and not re.search(r"[`*#|@\[]", lines[0]) and not bare_mentions(card)
    assert card.count(decision["reason"].split(";")[0]) == 1  # the reason, once
    # three test questions: the reference, the challenger's and the base model's answers side by side
    head = lines.index("| question | reference | challenger | base model |")
    samples = read_json(paths.evaluation)["samples"][:3]
    rows = lines[head + 2:head + 2 + len(samples)]
    assert len(samples) == 3 and all(row.count(" | ") == 3 for row in rows)
    for row, s in zip(rows, samples, strict=True):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[1].startswith(" ".join(s["reference"].split())[:40]) and all(cells[2:]), row
    assert (f'```bash\nexport MLFLOW_TRACKING_URI={uri}\npython -m ml rollback --profile e2e --reason "..."\n'
            f'python -m ml promote --profile e2e --version {registered["version"]} --reason "..."\n```') in card
