"""Measure the CPU settings the transformers backend picks, against the alternatives, in one run.

    python benchmarks/cpu_settings.py [--model smollm2-135m] [--batch 16] [--tokens 32]

Prints decode and prefill throughput for: the chosen settings (threads = cores, denormals flushed, bf16 where
the CPU has it) and each setting flipped on its own, as ratios against the chosen one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def measure(model, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for a batch of random prompts."""
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (batch, prompt_len))
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up: first-call kernel setup is not what we measure
        cache = DynamicCache()
        t = time.perf_counter()
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        prefill = batch * prompt_len / (time.perf_counter() - t)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        decode = batch * steps / (time.perf_counter() - t)
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    from cai.models import cpu_supports_bf16, load_causal_lm, resolve_model

    ref = resolve_model(args.model)
    cores = len(os.sched_getaffinity(0))
    chosen = dict(threads=cores, flush=True, dtype="bfloat16" if cpu_supports_bf16() else "float32")
    variants = [("chosen", chosen), ("threads=1", {**chosen, "threads": 1}),
                ("no denormal flush", {**chosen, "flush": False}),
                ("float32" if chosen["dtype"] == "bfloat16" else "bfloat16",
                 {**chosen, "dtype": "float32" if chosen["dtype"] == "bfloat16" else "bfloat16"})]
    print(f"model={args.model} batch={args.batch} prompt_len={args.prompt_len} decode_tokens={args.tokens} "
          f"cores={cores} cpu_bf16={cpu_supports_bf16()}")
    results = {}
    models = {}
    for name, v in variants:
        torch.set_num_threads(v["threads"])
        torch.set_flush_denormal(v["flush"])
        if v["dtype"] not in models:
            models[v["dtype"]] = load_causal_lm(ref, v["dtype"], "cpu")
        # best of 3: the first call at a new shape also pays for kernel selection, which is not what we compare
        runs = [measure(models[v["dtype"]], args.batch, args.prompt_len, args.tokens) for _ in range(3)]
        results[name] = (max(r[0] for r in runs), max(r[1] for r in runs))
    base = results["chosen"]
    print(f"{'setting':<20} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill x':>10} {'decode x':>9}")
    for name, (p, d) in results.items():
        print(f"{name:<20} {p:>14.1f} {d:>13.1f} {p / base[0]:>10.2f} {d / base[1]:>9.2f}")


if __name__ == "__main__":
    main()
