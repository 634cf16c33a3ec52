"""The review card: a model version's description in MLflow, a screen of markdown a person reads
to check a decision. Pure: it renders what the run folder and the registry already hold.

First a one-line plain summary (MLflow's versions table shows a description's start raw, so it
holds no markup), then the decision's reason, once; both models' scores with the interval; the
data (and the training rows added or removed since the champion), the settings that differ from
the champion's, the training's time and speed; three test questions with the reference answer and
both models' answers side by side; the exact rollback and manual-promotion commands for this
registry and version; links to where the run happened. No bare `@word`: MLflow's markdown would
link it to a GitHub user.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

from ml.config import redact, role

GUARD_LABELS = {"decision_accuracy": "yes/no/maybe right", "degenerate_answers": "degenerate answers"}


def _cell(text: Any, limit: int = 220) -> str:
    """One markdown table cell: no line breaks or pipes, long text cut."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit] + "…"


def param_value(value: Any) -> str:
    """A setting as MLflow holds it among a run's params (lists and mappings as JSON), any URI's
    credentials hidden."""
    return redact(json.dumps(value) if isinstance(value, (list, dict)) else str(value))


def config_changes(this: Mapping[str, Any], champion: Mapping[str, str] | None) -> list[tuple[str, str, str]]:
    """(setting, the champion's value, this run's) for every training setting (ml.config `ROLES`)
    that differs (`champion`: its MLflow run's params, values as logged; what else its run logged,
    such as the logged model's own params, is not a setting)."""
    if champion is None:
        return []
    keys = sorted(k for k in this if role(k) == "training")
    return [(k, champion.get(k, "-"), param_value(this[k])) for k in keys if champion.get(k) != param_value(this[k])]


def row_changes(this: Mapping[str, list[str]], champion: Mapping[str, list[str]] | None) -> tuple[int, int] | None:
    """(added, removed) training rows by question since the champion's (`ml.identity.row_hashes` records)."""
    if champion is None:
        return None
    ours, theirs = set(this.get("question", ())), set(champion.get("question", ()))
    return len(ours - theirs), len(theirs - ours)


def scores_table(decision: Mapping[str, Any], ch: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """The loss and each guardrail: both models' values, the change with its interval, the verdict."""
    conf = f"{decision['confidence']:.0%} " if decision.get("confidence") else ""
    lines = [f"| | challenger | {decision['baseline']} | change, {conf}interval | verdict |",
             "| --- | ---: | ---: | --- | --- |"]
    change, verdict = "", "not compared (see above)"
    if decision.get("low") is not None:
        change = f"improvement {decision['improvement']:+.4f} [{decision['low']:+.4f}, {decision['high']:+.4f}]"
        verdict = ("beyond" if decision["low"] > decision["min_delta"] else "not beyond") + \
            f" min_delta {decision['min_delta']:g}"
    lines.append(f"| test loss per answer token | {ch['loss']:.4f} | {base['loss']:.4f} | {change} | {verdict} |")
    if decision.get("challenger_nats_per_byte") is not None:
        lines.append(f"| nats per answer byte | {decision['challenger_nats_per_byte']:.4f} | "
                     f"{decision['baseline_nats_per_byte']:.4f} | | |")
    guards = decision.get("guardrails") or []
    if ch.get("decision_accuracy") is not None and not any(g["metric"] == "decision_accuracy" for g in guards):
        lines.append(f"| yes/no/maybe right | {ch['decision_accuracy']:.1%} | {base['decision_accuracy']:.1%} | | |")
    for g in guards:
        label = f"{GUARD_LABELS.get(g['metric'], g['metric'])} (guardrail, margin {g['margin']:.1%})"
        if g["verdict"] == "not applicable":
            lines.append(f"| {label} | – | – | – | not applicable: {_cell(g['note'], 160)} |")
        else:
            lines.append(f"| {label} | {g['challenger']:.1%} | {g['baseline']:.1%} | {g['change']:+.1%} "
                         f"[{g['low']:+.1%}, {g['high']:+.1%}] over {g['rows']} rows | {g['verdict']}: {g['note']} |")
    return lines


def no_mentions(text: str) -> str:
    """`text` with every `@word` in a code span: MLflow's markdown links a bare `@champion` to a GitHub
    user of that name. An e-mail address (a letter before the @) and a code span stay as they are."""
    parts = text.split("`")  # the odd parts are already code spans
    return "`".join(MENTION.sub(r"`\1`", p) if i % 2 == 0 else p for i, p in enumerate(parts))


MENTION = re.compile(r"(?<![\w@`])(@[A-Za-z0-9_][A-Za-z0-9_-]*)")


def summary(decision: Mapping[str, Any], awaiting_approval: bool = False) -> str:
    """The card's first line, plain text (no markup: MLflow's versions table shows it raw): what
    became of the version and the numbers that decided it."""
    outcome, name = decision["outcome"], decision["baseline"]
    # The outcome first, in few words: the versions table cuts the line after about 30 characters.
    if outcome == "promote":
        head = "Awaiting approval" if awaiting_approval and not decision.get("review") else "Promoted"
    elif outcome == "keep":
        blocked = [GUARD_LABELS.get(g["metric"], g["metric"]) for g in decision.get("guardrails") or ()
                   if g.get("verdict") == "blocks"]
        review = decision.get("review")
        head = ("Kept out, no answer to the approval request" if review and review["timed_out"] else
                f"Kept out, rejected by {review['by'] or 'an anonymous user'}" if review else
                f"Kept out by the guardrail {', '.join(blocked)}" if blocked else "Kept out")
    else:
        why = str(decision["reason"]).removeprefix("NEEDS REVIEW: ").split(";")[0].split(". ")[0]
        head = f"Needs review ({why})"
    line = f"{head}: test loss {decision['challenger_loss']:.4f} vs {decision['baseline_loss']:.4f} of {name}"
    if decision.get("low") is not None:
        line += (f", improvement {decision['improvement']:+.4f} ({decision['confidence']:.0%} interval "
                 f"{decision['low']:+.4f} to {decision['high']:+.4f}; promotion needs more than "
                 f"{decision['min_delta']:g})")
    plain = " ".join(line.replace("@", "").replace("`", "").replace("|", "/").replace("#", "").split())
    return plain + "."


def commands(tracking_uri: str, profile: str, version: str, sets: Mapping[str, str] | None = None) -> list[str]:
    """The rollback and the manual promotion of this version, for the registry this card lives in: its
    tracking URI first (credentials hidden; the CLI refuses to guess a registry), then the two commands,
    short enough to read without scrolling in MLflow's page."""
    opts = f"--profile {shlex.quote(profile)}" + "".join(f" --set {shlex.quote(f'{k}={v}')}"
                                                          for k, v in (sets or {}).items())
    return [f"export MLFLOW_TRACKING_URI={shlex.quote(redact(tracking_uri))}",
            f'python -m ml rollback {opts} --reason "..."',
            f'python -m ml promote {opts} --version {version} --reason "..."']


def answers_table(samples: list[Mapping[str, Any]], name: str) -> list[str]:
    """Per sample question, a row: the question, the reference answer, the challenger's and its
    comparator's (the champion or the base model) answers side by side."""
    def said(text: Any) -> str:
        return _cell(no_mentions(str(text))) if str(text or "").strip() else "*(empty answer)*"

    lines = [f"| question | reference | challenger | {name} |", "| --- | --- | --- | --- |"]
    return lines + [f"| {_cell(no_mentions(s['question']), 160)} | {said(s.get('reference', '–'))} | "
                    f"{said(s.get('challenger'))} | {said(s.get('baseline'))} |" for s in samples]


EXPORT_HEAD = "**Export**"


def export_lines(tags: Mapping[str, str]) -> list[str]:
    """The card's paragraph on the version's merged export, from its tags (`export`: where it is,
    `export_*`: its check's numbers, or when it was pruned; ml/registry.py writes them); none without."""
    if tags.get("export_pruned") and not tags.get("export"):
        return [f"{EXPORT_HEAD} pruned {_cell(tags['export_pruned'])} (the version held no alias); "
                "`python -m ml export --version N` makes it again."]
    if not tags.get("export"):
        return []
    base = f" (its 4-bit base, {tags['export_quantized_base']}, dequantized first)" \
        if tags.get("export_quantized_base") else ""
    return [f"{EXPORT_HEAD} merged {tags.get('export_dtype', '16-bit')} model `{tags['export']}`{base}, checked "
            f"against the adapter model on {tags.get('export_rows', '?')} test rows and "
            f"{tags.get('export_prompts', '?')} prompts: mean per-row loss {float(tags['export_loss_gap']):.3%} "
            f"apart, {float(tags['export_token_match']):.1%} of the greedy tokens identical; the bare base model "
            f"{float(tags['export_base_loss_gap']):.3%} and {float(tags['export_base_token_match']):.1%}. Check "
            f"{_cell(tags.get('export_check', ''))}."]


def with_export(card: str, tags: Mapping[str, str]) -> str:
    """`card` with its export paragraph (`export_lines`) as the tags say now: in place of the old one,
    else before the commands, else at the end."""
    paragraphs = [p for p in card.rstrip("\n").split("\n\n") if not p.startswith(EXPORT_HEAD)] if card else []
    new = export_lines(tags)
    if new:
        at = next((i for i, p in enumerate(paragraphs) if p.startswith(("**Undo or override**", "**Links**"))),
                  len(paragraphs))
        paragraphs.insert(at, new[0])
    return "\n\n".join(paragraphs) + "\n"


def render(decision: Mapping[str, Any], evaluation: Mapping[str, Any], snapshot: Mapping[str, Any],
           trained: Mapping[str, Any], changes: list[tuple[str, str, str]], rows: tuple[int, int] | None,
           links: Mapping[str, str], awaiting_approval: bool = False, undo: list[str] | None = None,
           export: Mapping[str, str] | None = None) -> str:
    """The card; `awaiting_approval`: the rule chose the version and a person has yet to answer; `undo`:
    the rollback and manual-promotion commands (`commands`) that end it; `export`: the version's tags,
    for its merged export (`export_lines`)."""
    ch, base, name = evaluation["challenger"], evaluation["baseline"], decision["baseline"]
    lines = [summary(decision, awaiting_approval), "", f"> {no_mentions(_cell(decision['reason'], 1200))}", "",
             *scores_table(decision, ch, base)]
    if decision.get("review"):
        r = decision["review"]
        said = ("no answer by " + r["at"] if r["timed_out"] else
                f"{'approved' if r['answer'] == 'Promote' else 'rejected'} by {r['by']} at {r['at']}")
        lines += ["", f"**Review** {_cell(said)}" + (f": {no_mentions(_cell(r['comment'], 400))}"
                                                     if r["comment"] else "") + "."]
    since = "" if rows is None else f"; since {name}: {rows[0]} training rows added, {rows[1]} removed"
    lines += ["", f"**Data** `{snapshot['source']}`, {snapshot['rows']} rows, fingerprint "
                  f"`{snapshot['fingerprint'][:12]}`{since}."]
    if evaluation.get("champion_version") is not None:
        lines.append("**Settings** " + ("the same as the champion's." if not changes else
                     "that differ from the champion's: " + ", ".join(f"`{k}` {a} → {b}" for k, a, b in changes[:12])
                     + ("" if len(changes) <= 12 else f" and {len(changes) - 12} more") + "."))
    speed = f", {trained['tokens_per_s']:,.0f} tokens/s" if trained.get("tokens_per_s") else ""
    gpu = f", peak GPU memory {trained['peak_gpu_gib']:.1f} GiB" if trained.get("peak_gpu_gib") else ""
    lines.append(f"**Training** {trained['global_step']} steps in {trained['runtime_s']:.0f} s{speed}{gpu}.")
    samples = (evaluation.get("samples") or [])[:3]
    if samples:
        lines += ["", f"**Answers** to {len(samples)} test questions", "", *answers_table(samples, name)]
    if export_lines(export or {}):
        lines += ["", *export_lines(export or {})]
    if undo:
        lines += ["", "**Undo or override** (a person's move, recorded on the versions with who and why): give "
                      "the champion alias back to the previous champion (rollback), or make this version the "
                      "champion (promote):", "", "```bash", *undo, "```"]
    if links:
        lines += ["", "**Links** " + " · ".join(f"[{label}]({url})" for label, url in links.items())]
    return "\n".join(lines) + "\n"
