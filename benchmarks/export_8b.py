"""The merged export of an 8B model on a 4-bit base, on a GPU: is it the adapter model, how long does
it take, how large is it, and what would merging into the 4-bit layers have cost?

    python3 benchmarks/export_8b.py [--model /tmp/l8b] [--rows 24] [--prompts 8] [--lora-std 0.02] [--tag NAME]

On the GPU machine (benchmarks/plans/export_8b.txt): the Llama-3.1-8B architecture with random
weights (`../shared/gpu/anchor_bench.py make` writes it to /tmp/l8b, bfloat16, with a stand-in
tokenizer) is quantized once to a bitsandbytes NF4 checkpoint (/tmp/l8b-bnb4, double quantization,
bfloat16 compute: what `unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit`, the default profile's base,
is). A LoRA adapter in the default profile's layout (r 16 on the 7 projections of every layer) gets
random non-zero B matrices (std `--lora-std`; training leaves B non-zero, here without a training
run) and is saved as the trainer saves one. Then `ml.export.make`, what `python -m ml export` and a
promotion run without the registry around them: the adapter model measured (4-bit base + LoRA, as
the evaluation loads it) with the adapter on and off, the base dequantized to bfloat16 and the
adapter merged, the merged model written in safetensors shards and reloaded from them with plain
transformers, and measured the same way, on `--rows` synthetic rows with PubMedQA-Ko-like lengths
(benchmarks/train_gpu.py's) and the greedy continuations of `--prompts` of them.

Last, the merge this avoids: PEFT's `merge_and_unload` straight into the 4-bit layers (it
dequantizes, adds and quantizes the sum again), measured against the same adapter model.

CPU rehearsal (no quantization there: the base as it is, and no naive 4-bit merge):
`python benchmarks/export_8b.py --model state/models/tiny-llama-ko --data data/sample/pubmedqa_ko_sample.jsonl
--rows 8 --prompts 2` (the synthetic rows' words are many tokens each for the tiny model's tokenizer).

Prints one 'RESULT {json}' line and writes $OUT/export_8b.json: seconds per part, the merged
model's size on disk and shards, the check (loss gap, token match; the bare base's), the naive
4-bit merge's gap and match, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def quantized_copy(src: Path, dst: Path) -> float:
    """`src` saved again as a bitsandbytes NF4 checkpoint in `dst` (once); seconds it took."""
    if (dst / "config.json").exists():
        return 0.0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    start = time.perf_counter()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(src).save_pretrained(partial)
    partial.rename(dst)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - start


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/l8b", help="the bfloat16 8B folder (anchor_bench.py make)")
    parser.add_argument("--rows", type=int, default=24, help="test rows")
    parser.add_argument("--data", help="test rows from this file (the demo sample's columns), not synthetic ones")
    parser.add_argument("--prompts", type=int, default=8, help="prompts whose greedy continuations are compared")
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random LoRA B matrices")
    parser.add_argument("--work", default="/tmp/export8b")
    parser.add_argument("--tag", default="export_8b")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from peft import PeftModel, get_peft_model
    from train_gpu import synthetic_rows

    from ml.config import load_config
    from ml.data import QAExample
    from ml.equivalence import compare, measure, prompts
    from ml.export import make
    from ml.modeling import load_base_model, load_tokenizer, load_with_adapter, lora_config
    from ml.prompt import PromptFormat

    seconds: dict[str, float] = {}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    base_dir = Path(args.model.rstrip("/") + "-bnb4") if cuda else Path(args.model)
    if cuda:
        seconds["quantize_base_once"] = round(quantized_copy(Path(args.model), base_dir), 1)
    cfg = load_config("pubmedqa-ko-llama31-8b", {"model.base_model": str(base_dir), "model.load_in_4bit": cuda})
    fmt = PromptFormat.from_config(cfg)

    start = time.perf_counter()
    base = load_base_model(cfg.model)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(cfg, base.config.num_hidden_layers))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=args.lora_std)
    model.save_pretrained(work / "adapter")
    load_tokenizer(cfg.model).save_pretrained(work / "adapter")
    del model, base
    _free()
    seconds["adapter"] = round(time.perf_counter() - start, 1)

    if args.data:
        from ml.sources import load_examples

        test = load_examples(load_config("demo", {"data.source": args.data}).data)[:args.rows]
    else:
        test = [QAExample(str(r["key"]), str(r["QUESTION"]), tuple(r["CONTEXTS"]), str(r["LONG_ANSWER"]))  # type: ignore[arg-type]
                for r in synthetic_rows(args.rows, seed=1)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    made = make(cfg.model, work / "adapter", test, fmt, args.prompts, cfg.eval.batch_size, work / "merged")
    seconds["export_and_check"] = round(time.perf_counter() - start, 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    shards = sorted(p.name for p in (work / "merged").glob("*.safetensors"))

    naive_cmp = None
    if cuda:  # the merge a 4-bit base invites: into the quantized layers, quantized again
        start = time.perf_counter()
        adapter_model, tokenizer = load_with_adapter(cfg.model, work / "adapter")
        asked = prompts(tokenizer, test, fmt, args.prompts)
        reference = measure(adapter_model, tokenizer, test, asked, fmt, cfg.eval.batch_size)
        del adapter_model
        _free()
        naive = PeftModel.from_pretrained(load_base_model(cfg.model), str(work / "adapter")).merge_and_unload()
        naive_cmp = asdict(compare(reference, measure(naive, tokenizer, test, asked, fmt, cfg.eval.batch_size)))
        seconds["naive_4bit_merge_and_measure"] = round(time.perf_counter() - start, 1)

    result = {"tag": args.tag, "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "seconds": seconds,
              "merged_gib": round(made.about["bytes"] / 2**30, 2), "shards": len(shards),
              "dtype": made.about["dtype"], "quantized_base": made.about["quantized_base"],
              "check": made.check.to_dict(), "naive_4bit_merge": naive_cmp,
              "peak_gpu_gib_export": round(peak, 1) if peak else None, "rows": len(test),
              "prompts": made.check.merged.prompts,
              "lora_std": args.lora_std}
    print("RESULT " + json.dumps(result))
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=2))
    return 0 if made.check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
