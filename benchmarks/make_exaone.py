"""A random checkpoint of EXAONE-3.5-2.4B-Instruct's size in its published layout, for the GPU benchmark.

    python3 benchmarks/make_exaone.py [/tmp/exaone24]

The real shape (ml/tiny.py's EXAONE_35_2_4B: 30 layers, hidden 2560, 32 heads over 8 key/value
heads of 80, FFN 7168, 102,400-token vocabulary, tied head) in bf16, written on the GPU in
about half a minute, with a stand-in word-level tokenizer over the words `t0`..`t102395` that
benchmarks/train_gpu.py's synthetic rows are made of (their higher words map to the unknown token).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ml.tiny import EXAONE_35_2_4B, exaone_checkpoint  # noqa: E402

SPECIALS = ["[BOS]", "[|endofturn|]", "[PAD]", "[UNK]"]  # EXAONE-3.5's names


def stand_in_tokenizer(folder: Path) -> Path:
    words = (EXAONE_35_2_4B.vocab or 0) - len(SPECIALS)
    vocab = {f"t{i}": i for i in range(words)} | {s: words + i for i, s in enumerate(SPECIALS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="[BOS]", eos_token="[|endofturn|]", pad_token="[PAD]",
                            unk_token="[UNK]", model_max_length=32768).save_pretrained(folder)
    return folder


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exaone24")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = stand_in_tokenizer(Path(tempfile.mkdtemp(prefix="exaone-tok-")))
    exaone_checkpoint(out, tok, EXAONE_35_2_4B, dtype=torch.bfloat16, device=device, std=0.02)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
