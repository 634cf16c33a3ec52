"""The activation-layout planner (ml/memory_plan.py): a pure function, tested on the CPU against the
peaks issue 31 measured on an H100 and on card sizes and model shapes it has not measured."""

from __future__ import annotations

import pytest

from ml.memory_plan import (
    EXAONE_35_24B,
    GIB,
    LLAMA_31_8B,
    MARGIN_MIN_BYTES,
    SMOLLM2_135M,
    Batch,
    ModelShape,
    peak_bytes,
    plan_layout,
)

SHAPES = {"llama-3.1-8b 4-bit": (LLAMA_31_8B, 4), "smollm2-135m 16-bit": (SMOLLM2_135M, 16),
          "exaone-3.5-2.4b 16-bit": (EXAONE_35_24B, 16)}
CARDS_GIB = (24, 40, 80, 141)
DEFAULT_BATCH = Batch(12, 512, 64)  # the default profile's longest micro-batch


def _plan(shape: ModelShape, bits: int, usable: float, batch: Batch = DEFAULT_BATCH, **kw: object):  # type: ignore[no-untyped-def]
    lora = shape.lora_params(16)
    return plan_layout(int(usable), shape, batch, weights_bytes=shape.weights_bytes(bits, lora), lora_params=lora,
                       **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("batch", "kept", "full_logits", "measured_gib"), [
    (Batch(12, 512, 64), 12, False, 13.85),  # default as shipped
    (Batch(12, 512, 64), 32, False, 26.3),   # default, uncheckpointed_layers=32
    (Batch(24, 512, 64), 32, False, 46.8),   # default, batch 24, all kept
    (Batch(3, 512, 64), 32, False, 11.1),    # seed profile as shipped (3 x 4)
    (Batch(3, 512), 0, True, 6.8),           # the reference Unsloth loop: all recomputed, full logits
])
def test_the_estimate_reproduces_the_peaks_measured_on_an_h100(batch: Batch, kept: int, full_logits: bool,
                                                               measured_gib: float) -> None:
    lora = LLAMA_31_8B.lora_params(16)
    assert lora == 41_943_040  # r16 on q, k, v, o, gate, up, down: what Unsloth reports for the 8B
    estimate = peak_bytes(LLAMA_31_8B, batch, kept, weights_bytes=LLAMA_31_8B.weights_bytes(4, lora),
                          lora_params=lora, full_logits=full_logits) / GIB
    assert estimate == pytest.approx(measured_gib, rel=0.15)


def test_the_longest_batch_is_padded_up_to_the_multiple() -> None:
    assert Batch(12, 512, 64).tokens == 12 * 512
    assert Batch(3, 500, 64).tokens == 3 * 512
    assert Batch(3, 500).tokens == 1500


@pytest.mark.parametrize("name", SHAPES)
def test_more_memory_never_keeps_fewer_layers(name: str) -> None:
    shape, bits = SHAPES[name]
    plans = [_plan(shape, bits, gib * GIB) for gib in (*CARDS_GIB, *range(2, 160, 3))]
    plans.sort(key=lambda p: p.usable_bytes)
    kept = [p.kept_layers for p in plans if p.fits]
    assert kept == sorted(kept) and kept
    for p in plans:
        assert 0 <= p.kept_layers <= shape.num_layers
        if p.fits:
            assert p.peak_bytes <= p.usable_bytes - p.margin_bytes


@pytest.mark.parametrize("gib", CARDS_GIB)
@pytest.mark.parametrize("name", SHAPES)
def test_each_card_gets_a_layout_that_fits_and_plenty_keeps_every_layer(name: str, gib: int) -> None:
    shape, bits = SHAPES[name]
    plan = _plan(shape, bits, gib * GIB)
    assert plan.fits and plan.peak_bytes <= plan.usable_bytes - plan.margin_bytes
    if gib >= 40:  # the default's 12 x 512 with every layer kept: 26 GiB for the 8B, less for the others
        assert plan.kept_layers == shape.num_layers, plan.reason
    assert f"{plan.kept_layers} of {shape.num_layers} layers keep their activations" in plan.reason


def test_a_24_gb_card_keeps_more_layers_of_the_8b_than_the_shipped_12_but_not_all() -> None:
    usable = 22.0 * GIB  # a 24 GB card: 22.35 GiB, less the CUDA context
    plan = _plan(LLAMA_31_8B, 4, usable)
    assert 12 < plan.kept_layers < 32, plan.reason


def test_no_layer_is_kept_when_nothing_fits_beyond_the_weights_and_one_checkpointed_batch() -> None:
    shape, lora = LLAMA_31_8B, LLAMA_31_8B.lora_params(16)
    weights = shape.weights_bytes(4, lora)
    least = peak_bytes(shape, DEFAULT_BATCH, 0, weights_bytes=weights, lora_params=lora)
    assert MARGIN_MIN_BYTES == GIB and 0.1 * (least + GIB) < GIB
    usable = least + GIB  # room (less the margin, 1 GiB at least) for 0 kept layers, not for one more
    plan = plan_layout(usable, shape, DEFAULT_BATCH, weights_bytes=weights, lora_params=lora)
    assert plan.fits and plan.kept_layers == 0, plan.reason


def test_a_plan_that_does_not_fit_even_with_every_layer_recomputed_says_so() -> None:
    plan = _plan(LLAMA_31_8B, 4, 6 * GIB)  # the weights alone take 5.5 GiB
    assert not plan.fits and plan.kept_layers == 0
    assert "even with every layer recomputed" in plan.reason
    # without checkpointing every layer keeps its activations: it is that or nothing
    plan = _plan(LLAMA_31_8B, 4, 22 * GIB, checkpointing="false")
    assert not plan.fits and plan.kept_layers == 32 and "no layer recomputed" in plan.reason
    assert _plan(LLAMA_31_8B, 4, 80 * GIB, checkpointing="false").kept_layers == 32


def test_longer_batches_keep_fewer_layers() -> None:
    kept = [_plan(LLAMA_31_8B, 4, 40 * GIB, Batch(b, 512, 64)).kept_layers for b in (6, 12, 24)]
    assert kept[0] == 32 and kept[0] >= kept[1] > kept[2]
