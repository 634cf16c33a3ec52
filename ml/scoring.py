"""A run's challenger and what it competes with, scored on the same test rows.

The model-bound half of evaluation: `score` takes the challenger loaded (the base model with this
run's adapter) and scores it, then its comparator on the same rows, each with its own prompt
settings: the champion (its adapter loaded beside the challenger's when both share the base
weights, else a model of its own) or, before there is one, the bare base model (the adapter
switched off). It writes the run's `reports/scores.json`: per-row scores, sample answers, and the
identities the promotion rule checks. The decision itself is ml/promotion.py's, recorded by
ml/evaluation.py.

Two callers. The trainer, right after it saved the adapter, while the model is still loaded
(`eval.score_while_loaded`; the train task fetched the champion into the run folder first), so
the base model is loaded once per run. The evaluate step (or promote, when @champion moved since),
which loads the model and scores (`score_again`) only when those scores are missing or no longer
stand (ml/evaluation.py): another adapter on disk, other test rows, or @champion moved since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer

from ml.config import PipelineConfig
from ml.data import read_split
from ml.evaluate import ENDS_WITHIN, LossResult, degenerate, evaluate_model, generate, sample_rows
from ml.identity import adapter_hash, base_identity, keys_hash, tokenizer_fingerprint, trained_on
from ml.modeling import load_with_adapter, model_ref, use_adapter
from ml.prompt import PromptFormat
from ml.runs import Champion, RunPaths, read_champion, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel as Model
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)


def score(cfg: PipelineConfig, paths: RunPaths, model: Model, tokenizer: Tokenizer, champ: Champion | None,
          where: str) -> dict[str, Any]:
    """Score the loaded challenger and its comparator on the test split; write and return the record."""
    start = time.perf_counter()
    parts: dict[str, float] = {}  # seconds of each part, in the log and the record

    def lap(name: str) -> None:
        parts[name] = round(time.perf_counter() - start - sum(parts.values()), 2)

    test = read_split(paths.splits, "test")
    m = cfg.model
    fmt = PromptFormat.from_config(cfg)
    model.eval()
    challenger = evaluate_model(model, tokenizer, test, fmt, cfg.eval.batch_size)
    log.info("challenger test loss %.4f over %d answer tokens%s", challenger.loss, challenger.tokens,
             accuracy_note(challenger))
    lap("challenger loss")
    identity = {"base_identity": base_identity(m.base_model, model_ref(m), getattr(model.config, "_commit_hash", None),
                                               m.revision),
                "tokenizer": tokenizer_fingerprint(tokenizer), "adapter_sha256": adapter_hash(paths.trained.adapter),
                "test_keys": keys_hash(ex.key for ex in test), "max_seq_length": str(m.max_seq_length)}
    lap("identities")
    # One greedy pass per model answers the prompts of the report's samples and of the guardrail on
    # degenerate answers: the first test prompts that leave room for the token budget.
    e = cfg.eval
    asked = sample_rows(tokenizer, test, fmt, max(e.num_sample_generations, e.sanity_prompts), e.max_new_tokens)
    answers = {"challenger": generate(model, tokenizer, asked, fmt, e.max_new_tokens)}
    lap("challenger answers")

    exclude: set[str] = set()
    review = None  # a reason no automatic decision can be made, found before scoring
    if champ is None:
        with model.disable_adapter():
            baseline = evaluate_model(model, tokenizer, test, fmt, cfg.eval.batch_size)
            answers["baseline"] = generate(model, tokenizer, asked, fmt, e.max_new_tokens)
        baseline_name, baseline_tok = "base model", identity["tokenizer"]
        lap("base model loss and answers")
    else:
        baseline_name = f"champion v{champ.version}"
        champ_fmt = PromptFormat(**champ.prompt_format) if champ.prompt_format else fmt
        if champ.trained_rows is None:
            review = f"{baseline_name} records no training rows, so it may be scored on rows it learned"
        else:
            exclude = trained_on(test, champ.trained_rows)
        shares_base = champ.base_model == m.base_model and champ.base_path is None
        if shares_base and champ.base_identity and champ.base_identity != identity["base_identity"]:
            review = (f"the base model {m.base_model} is now {identity['base_identity']}, not the "
                      f"{champ.base_identity} that {baseline_name} was trained on: it cannot be scored as it was")
        # A champion that ships its own copy of the base: the same weights and tokenizer as this one
        # make it this model with the champion's adapter too (a second model would be loaded plainly,
        # which a process that Unsloth patched cannot generate from).
        shares_base = shares_base or (champ.base_path is not None and champ.base_identity == identity["base_identity"]
                                      and tokenizer_fingerprint(AutoTokenizer.from_pretrained(champ.base_path))
                                      == identity["tokenizer"])
        if shares_base:  # same base weights: the champion's adapter on this model, not a second model
            use_adapter(model, Path(champ.adapter_dir))
            champ_model, champ_tok = model, tokenizer
        else:
            champ_cfg = m.model_copy(update={"base_model": champ.base_path or champ.base_model})
            champ_model, champ_tok = load_with_adapter(champ_cfg, Path(champ.adapter_dir))
        lap("champion loaded")
        baseline = evaluate_model(champ_model, champ_tok, test, champ_fmt, cfg.eval.batch_size)
        baseline_tok = tokenizer_fingerprint(champ_tok)
        answers["baseline"] = generate(champ_model, champ_tok, asked, champ_fmt, e.max_new_tokens)
        lap("champion loss and answers")
    log.info("%s test loss %.4f%s", baseline_name, baseline.loss, accuracy_note(baseline))
    samples = [{"key": ex.key, "question": ex.question, "reference": ex.answer, "challenger": c, "baseline": b}
               for ex, (c, _), (b, _) in zip(asked, answers["challenger"], answers["baseline"],
                                             strict=True)][:e.num_sample_generations]
    sanity = asked[:e.sanity_prompts]
    fits = [len(tokenizer(ex.target(fmt.lead_with_decision), add_special_tokens=False)["input_ids"]) * ENDS_WITHIN
            <= e.max_new_tokens for ex in sanity]
    flaws = {m: [degenerate(text, stopped, fit) for (text, stopped), fit in zip(gen, fits, strict=False)]
             for m, gen in answers.items()}
    generations = {"keys": [ex.key for ex in sanity], **flaws}
    log.info("degenerate answers of %d: challenger %d, %s %d", len(sanity),
             sum(why is not None for why in flaws["challenger"]), baseline_name,
             sum(why is not None for why in flaws["baseline"]))
    record = {"challenger": asdict(challenger), "baseline": asdict(baseline), "baseline_name": baseline_name,
              "baseline_tokenizer": baseline_tok, "champion_version": champ.version if champ else None,
              "identity": identity, "excluded_rows": sorted(exclude), "review": review, "samples": samples,
              "generations": generations,
              "scored_in": where, "seconds": round(time.perf_counter() - start, 1), "seconds_by_part": parts}
    write_json(paths.scores, record)
    log.info("scored in the %s in %.1fs (%s)", where, record["seconds"],
             ", ".join(f"{name} {sec:.2f}s" for name, sec in parts.items()))
    return record


def score_again(cfg: PipelineConfig, paths: RunPaths, champ: Champion | None, where: str) -> dict[str, Any]:
    """Load the challenger (the base model with this run's adapter) and score it against `champ`."""
    model, tokenizer = load_with_adapter(cfg.model, paths.trained.adapter)
    return score(cfg, paths, model, tokenizer, champ, where)


def after_training(cfg: PipelineConfig, paths: RunPaths) -> Callable[[Model, Tokenizer], None] | None:
    """What the trainer runs with its model still loaded: scoring against the champion the train task
    fetched (None when switched off or nothing was fetched). A failure there costs only time: it is
    logged, and the evaluate step loads the model and scores."""
    fetched, champ = read_champion(paths.champion)
    if not (cfg.eval.score_while_loaded and fetched):
        return None

    def run(model: Model, tokenizer: Tokenizer) -> None:
        try:
            score(cfg, paths, model, tokenizer, champ, "training process")
        except Exception as exc:  # noqa: BLE001  (the adapter is saved; evaluate scores instead)
            log.warning("scoring in the training process failed; the evaluate step will score: %s: %s",
                        type(exc).__name__, exc, exc_info=True)
            paths.scores.unlink(missing_ok=True)

    return run


def accuracy_note(result: LossResult) -> str:
    return "" if result.decision_accuracy is None else (
        f"; yes/no/maybe read as the first answer word: {result.decision_accuracy:.1%} of {result.decisions}")
