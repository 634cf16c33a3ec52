"""How many decoder layers keep their activations: planned from the card's memory before step 1.

`plan_layout` is a pure function (no torch, no device): given the memory the process may use, the
model's shape, the longest micro-batch the data can produce and a safety margin, it returns how many
of the last decoder layers skip the recompute (`train.uncheckpointed_layers: auto`), the estimated
peak and why. It only chooses which layers recompute: every update is the same whatever it returns.

The estimate of the peak (bytes) for `kept` of `L` layers and `T` tokens in the longest micro-batch:

    weights + LoRA state + T x (kept x per_layer + working) [+ T x vocab x 4 with the model's own loss]

- weights: what is resident when training starts (measured by the trainer; from the shape here:
  4-bit linear layers at 0.5 bytes a parameter plus their quantisation constants, 16-bit elsewhere);
- LoRA state: the adapter's gradients (fp32) and optimizer state (8-bit AdamW: 2 bytes a parameter,
  AdamW: 8); the fp32 LoRA weights themselves count as resident;
- per_layer, what a layer that keeps its activations stores per token (bf16):
  2 bytes x (C_HIDDEN x hidden + 2 x kv_dim + 2 x intermediate). Counted by hand for Unsloth's LoRA
  kernels: the MLP keeps its gate and up projections (2 x intermediate; SwiGLU is recomputed in its
  backward), attention keeps k and v (2 x kv_dim) and about six hidden-sized tensors (the two norms'
  inputs, the LoRA inputs of qkv, o and the MLP, q, the attention output), some shared;
- a checkpointed layer keeps only its input, which Unsloth's mode offloads to the CPU: nothing on the
  GPU (`true`, transformers' own checkpointing, would keep 2 x hidden bytes a token; counted);
- working: the backward pass's working set, about one layer's activations and their gradients at a
  time (the recompute of a checkpointed layer, or the gradients of a kept one): WORKING_LAYERS x per_layer.

Calibration (issue 31, H100 80GB, Llama-3.1-8B 4-bit, LoRA r16 on 7 modules, 12 x 512-token longest
micro-batch, TRL's fused loss head; peaks are torch.cuda.max_memory_allocated):
  12 kept 13.85 GiB, 32 kept 26.3 GiB  -> 20 layers x 6,144 tokens = 12.45 GiB: 108.8 kB a token a layer,
                                          so C_HIDDEN = (108,792 / 2 - 2 x 1,024 - 2 x 14,336) / 4,096 = 5.78
  32 kept at 24 x 512 tokens 46.8 GiB  -> 6,144 more tokens cost 20.5 GiB: 3.58 MB a token, of which
                                          32 layers are 3.48 MB; the rest, 101 kB, is 0.93 of a layer
                                          (WORKING_LAYERS, rounded up to 1.0)
  what is left at 0 tokens, 5.8 GiB, is the weights and LoRA state the shape gives (5.7 GiB).
The seed's 3 x 4 (1,536 tokens, 32 kept, 11.1 GiB) and the reference loop (512 x 3, every layer
checkpointed, the model's own loss with its full fp32 logits, 6.8 GiB) are then predictions, not
fits; tests/test_memory_plan.py checks all five rows within 15 %.

The margin (`MARGIN_SHARE` of the usable memory, at least `MARGIN_MIN_BYTES`) covers the caching
allocator's fragmentation and the error of this estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
C_HIDDEN = 5.78  # hidden-sized bf16 tensors a kept layer stores per token, beside k, v, gate and up (fitted)
WORKING_LAYERS = 1.0  # the backward pass's working set per token, in layers' activations (fitted: 0.93)
MARGIN_SHARE = 0.10
MARGIN_MIN_BYTES = 1 * GIB
QUANT_OVERHEAD_4BIT = 0.127 / 4  # bitsandbytes NF4: a fp32 absmax per 64 weights, double-quantised
OPTIMIZER_STATE_BYTES = {"8bit": 2, "fp32": 8}  # per trainable parameter: AdamW's two moments


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linear_params(self) -> int:
        """Parameters of the decoder layers' projections (q, k, v, o, gate, up, down)."""
        h, i = self.hidden, self.intermediate
        return self.num_layers * (2 * h * h + 2 * h * self.kv_dim + 3 * h * i)

    def lora_params(self, r: int, modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj")) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return self.num_layers * sum(r * sum(dims[m]) for m in modules if m in dims)

    def weights_bytes(self, bits: int, lora_params: int = 0) -> int:
        """Resident bytes of the loaded model: projections in `bits` (4 or 16), embeddings and head in
        16-bit, the LoRA weights in fp32."""
        per_param = 0.5 * (1 + QUANT_OVERHEAD_4BIT) if bits == 4 else 2.0
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return int(self.linear_params() * per_param + 2 * embeddings + 4 * lora_params)

    def kept_layer_bytes_per_token(self) -> float:
        """bf16 activations a decoder layer that skips the recompute keeps, per token."""
        return 2.0 * (C_HIDDEN * self.hidden + 2 * self.kv_dim + 2 * self.intermediate)


# Published shapes (config.json), for tests and examples.
LLAMA_31_8B = ModelShape(32, 4096, 14336, 32, 8, 128256)
SMOLLM2_135M = ModelShape(30, 576, 1536, 9, 3, 49152, tied_embeddings=True)
EXAONE_35_24B = ModelShape(30, 2560, 7168, 32, 8, 102400, tied_embeddings=True)


@dataclass(frozen=True)
class Batch:
    """The longest micro-batch the data can produce: every row at max_seq_length, padded up."""
    size: int
    max_seq_length: int
    pad_to_multiple_of: int | None = None

    @property
    def tokens(self) -> int:
        length = self.max_seq_length
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return self.size * length


@dataclass(frozen=True)
class Plan:
    kept_layers: int  # the last N decoder layers keep their activations
    num_layers: int
    peak_bytes: int  # estimated peak with that layout
    usable_bytes: int  # what the process may use
    margin_bytes: int
    fits: bool  # False: not even the least memory-hungry layout fits
    reason: str

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def margin(usable_bytes: int) -> int:
    return max(int(MARGIN_SHARE * usable_bytes), MARGIN_MIN_BYTES)


def peak_bytes(shape: ModelShape, batch: Batch, kept: int, *, weights_bytes: int, lora_params: int,
               optimizer: str = "8bit", checkpointing: str = "unsloth", full_logits: bool = False) -> int:
    """Estimated peak GPU memory with the last `kept` layers keeping their activations (see the module doc)."""
    tokens, layer = batch.tokens, shape.kept_layer_bytes_per_token()
    lora_state = lora_params * (4 + OPTIMIZER_STATE_BYTES[optimizer])
    checkpointed_input = 0 if checkpointing == "unsloth" else 2 * shape.hidden  # unsloth offloads it
    per_token = (kept * layer + (shape.num_layers - kept) * checkpointed_input + WORKING_LAYERS * layer
                 + (4 * shape.vocab if full_logits else 0))
    return int(weights_bytes + lora_state + tokens * per_token)


def plan_layout(usable_bytes: int, shape: ModelShape, batch: Batch, *, weights_bytes: int, lora_params: int,
                optimizer: str = "8bit", checkpointing: str = "unsloth", full_logits: bool = False) -> Plan:
    """The most decoder layers (0..num_layers) that keep their activations within `usable_bytes` less the
    margin. `checkpointing="false"` recomputes nothing, so every layer keeps its activations."""
    room = usable_bytes - margin(usable_bytes)

    def peak(kept: int) -> int:
        return peak_bytes(shape, batch, kept, weights_bytes=weights_bytes, lora_params=lora_params,
                          optimizer=optimizer, checkpointing=checkpointing, full_logits=full_logits)

    least = shape.num_layers if checkpointing == "false" else 0
    layout = f"{batch.size} x {batch.tokens // batch.size} tokens"
    room_text = (f"{usable_bytes / GIB:.1f} GiB usable less a {margin(usable_bytes) / GIB:.1f} GiB margin "
                 f"= {room / GIB:.1f} GiB")
    if peak(least) > room:
        return Plan(least, shape.num_layers, peak(least), usable_bytes, margin(usable_bytes), False,
                    f"the longest micro-batch ({layout}) needs about {peak(least) / GIB:.1f} GiB even with "
                    f"{'every layer recomputed' if least == 0 else 'no layer recomputed'}; {room_text}")
    kept = least
    while kept < shape.num_layers and peak(kept + 1) <= room:  # peak grows with each kept layer
        kept += 1
    return Plan(kept, shape.num_layers, peak(kept), usable_bytes, margin(usable_bytes), True,
                f"{kept} of {shape.num_layers} layers keep their activations: about {peak(kept) / GIB:.1f} GiB "
                f"at the longest micro-batch ({layout}) within {room_text}")
