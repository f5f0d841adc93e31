"""The generation path's two float32-CPU choices, each on and off, interleaved in one process.

    python benchmarks/decode_ab.py repeats=3 [model=smollm2-135m] [gen_prompts=12] [gen_tokens=80]

Times `TransformersBackend.generate` on bench.py's critique requests (EOS ignored, so every row makes
gen_tokens tokens) with: neither (float32 decode weights, prefix cache rows copied per row: the backend before
these two), float16 decode weights only, cascade attention only, and both (what `dtype=auto` runs on a CPU
without bf16). The four run in turn, `repeats` times, so the VM's drifting speed hits them alike; it prints each
timing and its ratio to "neither" in the same round. Settings are bench.py's (`python benchmarks/bench.py
--help`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench import BenchConfig, critique_conversations  # noqa: E402

from cai.backends import Sampling  # noqa: E402
from cai.backends.transformers_backend import TransformersBackend  # noqa: E402
from cai.config import build_config, parse_overrides  # noqa: E402
from cai.errors import CaiError, cli_main  # noqa: E402
from cai.models import resolve_model  # noqa: E402

VARIANTS = (("neither", False, False), ("fp16 decode", True, False), ("cascade", False, True), ("both", True, True))


@cli_main
def main(argv: list[str]) -> None:
    cfg = build_config(BenchConfig, {}, "command line", parse_overrides(argv))
    be = TransformersBackend(resolve_model(cfg.model), batch_size=cfg.batch_size, progress=False)
    if not be.phase.fp16_decode or be.model.config._attn_implementation != "cai_cascade":
        raise CaiError(f"{be.identity}: this CPU or model runs neither float16 decode weights nor cascade attention "
                       "(dtype=auto on a CPU without bf16)")
    convs = critique_conversations(cfg, cfg.gen_prompts)
    seeds = [cfg.seed + i for i in range(len(convs))]
    sampling = Sampling(max_new_tokens=cfg.gen_tokens, temperature=0.7, top_p=0.9)
    be.eos_ids = set()
    decoding = be.phase.decoding
    be.generate(convs, Sampling(max_new_tokens=2), seeds)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    for r in range(cfg.repeats):
        for name, fp16, cascade in VARIANTS:
            be.phase.decoding = decoding if fp16 else contextlib.nullcontext
            be.model.set_attn_implementation("cai_cascade" if cascade else "sdpa")
            t = time.perf_counter()
            made = sum(c.completion_tokens for c in be.generate(convs, sampling, seeds))
            rates[name].append(made / (time.perf_counter() - t))
            print(f"round {r + 1} {name:12s} {rates[name][-1]:6.1f} tok/s  x{rates[name][-1] / rates['neither'][-1]:.2f}",
                  flush=True)
    for name, _, _ in VARIANTS:
        ratios = [a / b for a, b in zip(rates[name], rates["neither"])]
        print(f"{name:12s} tok/s {' '.join(f'{x:.1f}' for x in rates[name])}  vs neither "
              f"{' '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
