"""The review card: a model version's description in MLflow, a screen of markdown a person reads
to check a decision. Pure: it renders what the run folder and the registry already hold.

The decision and why (the improvement with its interval, the rows), both models' scores, the
data (and the training rows added or removed since the champion), the settings that differ from
the champion's, the training's time and speed, three test questions answered by both models
side by side, and links to where the run happened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ml.config import redact, role

HEADINGS = {"promote": "PROMOTED to @champion", "keep": "Kept out: the champion stays",
            "needs_review": "NEEDS REVIEW: nothing moved"}
AWAITING = "AWAITING APPROVAL: the rule would promote it to @champion"
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


def render(decision: Mapping[str, Any], evaluation: Mapping[str, Any], snapshot: Mapping[str, Any],
           trained: Mapping[str, Any], changes: list[tuple[str, str, str]], rows: tuple[int, int] | None,
           links: Mapping[str, str], awaiting_approval: bool = False) -> str:
    """The card; `awaiting_approval`: the rule chose the version and a person has yet to answer."""
    ch, base, name = evaluation["challenger"], evaluation["baseline"], decision["baseline"]
    heading = AWAITING if awaiting_approval and decision["outcome"] == "promote" and not decision.get("review") \
        else HEADINGS.get(decision["outcome"], decision["outcome"])
    lines = [f"### {heading}", ""]
    if decision.get("low") is not None:
        lines.append(f"Improvement **{decision['improvement']:+.4f}** nats per answer token, "
                     f"{decision['confidence']:.0%} interval [{decision['low']:+.4f}, {decision['high']:+.4f}] over "
                     f"{decision['rows']} test rows (promotion needs the lower bound above "
                     f"{decision['min_delta']:g}).")
    lines += ["", f"> {_cell(decision['reason'], 1200)}", "", *scores_table(decision, ch, base)]
    if decision.get("review"):
        r = decision["review"]
        said = ("no answer by " + r["at"] if r["timed_out"] else
                f"{'approved' if r['answer'] == 'Promote' else 'rejected'} by {r['by']} at {r['at']}")
        lines += ["", f"**Review** {_cell(said)}" + (f": {_cell(r['comment'], 400)}" if r["comment"] else "") + "."]
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
    samples = evaluation.get("samples") or []
    if samples:
        other = "baseline" if any("baseline" in s for s in samples) else None
        lines += ["", f"**Answers** to {len(samples[:3])} test questions", "",
                  "| question | challenger |" + (f" {name} |" if other else ""),
                  "| --- | --- |" + (" --- |" if other else "")]
        lines += [f"| {_cell(s['question'], 160)} | {_cell(s['challenger'])} |"
                  + (f" {_cell(s.get('baseline', ''))} |" if other else "") for s in samples[:3]]
    if links:
        lines += ["", "**Links** " + " · ".join(f"[{label}]({url})" for label, url in links.items())]
    return "\n".join(lines) + "\n"
