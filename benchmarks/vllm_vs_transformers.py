"""The vLLM backend against the transformers backend on the same GPU, through cai's own Backend calls.

    python benchmarks/vllm_vs_transformers.py [--model smollm2-135m] [--prompts 238] [--tokens 128] [--dtype bfloat16]

Measures what the stages do: sampled answers to the red-team prompts with one seed per request (SL answers,
RL pairs), and A/B option scoring of labeler prompts (AI feedback). Prints answers/s, generated tokens/s and
scored prompts/s per backend, and vLLM's speed-up. Needs a CUDA GPU and the vllm extra.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(backend, prompts: list[str], tokens: int) -> dict:
    from cai.backends import Sampling

    conversations = [[{"role": "user", "content": p}] for p in prompts]
    sampling = Sampling(max_new_tokens=tokens, temperature=1.0)
    backend.generate(conversations[:4], sampling, [0, 1, 2, 3])  # warm-up: kernel selection, CUDA graphs
    t = time.perf_counter()
    answers = backend.generate(conversations, sampling, list(range(len(conversations))))
    gen_s = time.perf_counter() - t
    labeler = [backend.chat_prompt([{"role": "user", "content": f"{p}\n\nWhich answer is better, (A) or (B)?"},
                                    {"role": "assistant", "content": "The answer is: ("}]) for p in prompts]
    t = time.perf_counter()
    backend.option_logprobs(labeler, ["A", "B"])
    score_s = time.perf_counter() - t
    n_tokens = sum(a.completion_tokens for a in answers)
    return {"answers/s": len(prompts) / gen_s, "tok/s": n_tokens / gen_s, "scored/s": len(prompts) / score_s,
            "tokens": n_tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=238)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64, help="transformers backend batch size")
    args = ap.parse_args()

    from cai.backends import release
    from cai.backends.transformers_backend import TransformersBackend
    from cai.backends.vllm_backend import VLLMBackend, require_vllm
    from cai.models import resolve_model

    require_vllm("benchmarks/vllm_vs_transformers.py")
    lines = (ROOT / "prompts" / "sets" / "red_team_train.jsonl").read_text().splitlines()
    prompts = [json.loads(x)["prompt"] for x in lines][:args.prompts]
    ref = resolve_model(args.model)
    results = {}
    hf = TransformersBackend(ref, dtype=args.dtype, device="cuda", batch_size=args.batch, progress=False)
    results["transformers"] = measure(hf, prompts, args.tokens)
    del hf
    import torch

    torch.cuda.empty_cache()
    vl = VLLMBackend(ref, dtype=args.dtype, gpu_memory_utilization=0.6, progress=False)
    results["vllm"] = measure(vl, prompts, args.tokens)
    release(vl)
    print(f"model={args.model} dtype={args.dtype} prompts={len(prompts)} max_new_tokens={args.tokens} "
          f"gpu={torch.cuda.get_device_name()}")
    print(f"{'backend':<14} {'answers/s':>10} {'gen tok/s':>10} {'scored/s':>9}")
    for name, r in results.items():
        print(f"{name:<14} {r['answers/s']:>10.1f} {r['tok/s']:>10.1f} {r['scored/s']:>9.1f}")
    h, v = results["transformers"], results["vllm"]
    print(f"vllm speed-up: generation {v['tok/s'] / h['tok/s']:.1f}x, scoring {v['scored/s'] / h['scored/s']:.1f}x")


if __name__ == "__main__":
    main()
