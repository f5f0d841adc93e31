"""`python benchmarks/bench.py [sections=gen,label,roofline,accuracy,ppo,scaling,demo] [key=value ...]` (`make bench`)

Measures the pipeline's hot paths on one model (default: the bundled SmolLM2-135M), each against a naive
baseline measured in the same run, and prints the ratios beside the targets of issue 6:
- gen: critique generation tokens/s with `TransformersBackend.generate` (the SL stage's path: batched, length
  bucketed, bf16 where the CPU has it) vs HF `model.generate` one prompt at a time, batch 1, float32; and, where
  llama-cpp-python is installed (`make peer`), the peer: llama.cpp single-stream on the bundled GGUF;
- label: AI labels/s with `cai.feedback.label_pairs` (both letters from one forward, a pair's K principles and
  both orders in one batch, shared-prefix KV cache) vs a naive labeler: one float32 forward of prompt+letter
  per option and per order, batch 1;
- roofline: this machine's matmul FLOP/s (big square matmuls) / the model's FLOPs per token = the prefill
  tokens/s it could reach; the labeling's forward tokens/s as a share of it;
- accuracy: each feedback template's accuracy and position consistency on a labeled set of pairs;
- ppo: a few PPO steps with the demo settings in a subprocess: time per step and peak RSS (the kernel's
  high-water mark of the subprocess's resident set, ru_maxrss), once per variant in `ppo_variants`: full (the demo
  config as it is), separate (full, with a value model of its own), lora (LoRA adapters: the reference is the
  policy with its adapters disabled, the value a head on the policy's backbone, activations recomputed in the
  backward); lora_keep and full_ckpt (not run unless named) turn activation checkpointing off / on against those;
  the peak is in GB (1e9 bytes), the per-phase figures in GiB;
- scaling: how generation tokens/s and labeling labels/s grow with batch size and prompt length (on
  `scaling_model`), and with model width (the tiny preset widened), and PPO step time with rollout batch size and
  width; a table, an SVG plot beside `out`, and a cost model fitted on them to predict a bigger run's cost;
- demo: `make demo` (constitution check, SL then RL demo configs) on a fresh run directory, timed.
Every ratio is computed from rates measured in this run. The results (and the machine) go to `out` as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cai.backends import Sampling
from cai.config import CritiqueConfig, F, FeedbackConfig, build_config, help_text, load_config, parse_overrides
from cai.constitution import load_constitution
from cai.critique import ChainSettings, choose_principle, critique_request
from cai.errors import CaiError, cli_main
from cai.io import read_jsonl, table, write_atomic
from cai.models import (
    cpu_supports_bf16,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    smollm2_gguf,
    tiny_config,
    tiny_dir,
)
from cai.paths import PROJECT_ROOT
from cai.prompts import PromptRecord, load_few_shot, load_labeled_set, load_prompts
from cai.records import stable_hash
from cai.store import JsonlStore, Metrics
from cai.templates import load_template

SECTIONS = ("gen", "label", "roofline", "accuracy", "ppo", "scaling", "demo")
# lora checkpoints activations (ppo.gradient_checkpointing=auto); lora_keep and full_ckpt show that trade each way
PPO_VARIANTS = {"full": [], "separate": ["ppo.value_model=separate"],
                "lora": ["ppo.lora.enabled=true", "ppo.value_model=auto"],
                "lora_keep": ["ppo.lora.enabled=true", "ppo.value_model=auto", "ppo.gradient_checkpointing=false"],
                "full_ckpt": ["ppo.gradient_checkpointing=true"]}
TEMPLATES = "prompts/templates/feedback_mc.txt,prompts/templates/feedback_mc_shared_prefix.txt"


@dataclass
class BenchConfig:
    sections: str = F(",".join(SECTIONS), f"comma-separated sections to run, of {','.join(SECTIONS)} "
                                          "(demo takes ~9 minutes)")
    model: str = F("smollm2-135m", "model of every section (tiny: seconds, for tests)")
    dtype: str = F("auto", "dtype of the fast paths (auto: bf16 where the CPU has it); baselines are float32")
    device: str = F("auto", "device of the fast paths, the baselines and the scaling section's models: auto (cuda "
                            "when available) | cpu | cuda | cuda:N; PPO runs where accelerate puts it (cuda when "
                            "available)", device=True)
    batch_size: int = F(16, "batch size of the fast paths (generation, labeling)")
    gen_prompts: int = F(12, "critique requests generated (red-team prompts of the labeled set)")
    gen_tokens: int = F(80, "new tokens per request; EOS is ignored on both paths, so each makes exactly this many")
    few_shot: int = F(1, "few-shot demonstrations in each critique request (the demo's setting)")
    labeled_set: str = F("prompts/sets/labeled_pairs.jsonl", "pairs with a known better answer: id, category "
                                                             "(harmless|helpful), prompt, better, worse")
    label_pairs: int = F(8, "pairs labeled by both labelers in the label section")
    principles: int = F(4, "K feedback principles per pair (pipelines/rl.yaml uses 4)")
    template: str = F("prompts/templates/feedback_mc.txt", "feedback template of the label section (the pipeline default)")
    harmless_constitution: str = F("constitutions/default.yaml", "feedback principles for harmless pairs")
    helpful_constitution: str = F("constitutions/helpful_honest.yaml", "feedback principles for helpful pairs")
    accuracy_templates: str = F(TEMPLATES, "comma-separated feedback templates compared in the accuracy section")
    accuracy_pairs: int = F(0, "labeled pairs in the accuracy section (0 = all)")
    repeats: int = F(1, "time each fast path and baseline this many times and keep the fastest (noisy machines)")
    matmul_size: int = F(2048, "side of the square matmuls that measure FLOP/s")
    ppo_config: str = F("pipelines/demo_rl.yaml", "stage config whose ppo settings and prompts the ppo section uses")
    ppo_steps: int = F(4, "PPO steps of each run in the ppo and scaling sections (the demo runs 4); s/step leaves out "
                          "the first step, which includes loading")
    ppo_variants: str = F("full,separate,lora", "comma-separated PPO variants of the ppo section, each in its own "
                                                "subprocess: " + ", ".join(f"{k} ({' '.join(v) or 'the config as it is'})"
                                                                         for k, v in PPO_VARIANTS.items()))
    scaling_model: str = F("", "model of the scaling section's batch and prompt-length sweeps ('' = model)")
    scaling_batches: str = F("1,4,16", "scaling: batch sizes of the batch sweep (one batch of that many requests each)")
    scaling_prompt_lengths: str = F("64,256,1024", "scaling: prompt lengths of the prompt-length sweep, in tokens of "
                                                   "the chat prompt (template included)")
    scaling_batch: int = F(4, "scaling: batch size of the prompt-length and width sweeps", ge=1)
    scaling_prompt_length: int = F(256, "scaling: prompt length (tokens) of the batch and width sweeps", ge=1)
    scaling_new_tokens: int = F(32, "scaling: new tokens per generated answer (EOS ignored: exactly this many)", ge=1)
    scaling_widths: str = F("64,128,256", "scaling: hidden sizes of the width sweep: the tiny preset (2 layers, "
                                          "hidden 64) widened, random init, cached like it; generation, labeling "
                                          "and PPO on each")
    scaling_ppo_batches: str = F("4,8", "scaling: PPO rollout batch sizes, each run on every width (ppo_config's "
                                        "ppo settings otherwise, ppo_steps steps, all in one subprocess)")
    scaling_plot: str = F("", "scaling: the SVG plot ('' = beside out: runs/bench.json -> runs/bench.scaling.svg)")
    demo_runs_dir: str = F("", "runs_dir of the demo section's fresh run (default: a temporary directory, removed)")
    peer: bool = F(True, "gen: also time llama.cpp on the bundled GGUF when llama-cpp-python is installed (make peer)")
    seed: int = F(0, "seed of sampling and principle choice")
    out: str = F("runs/bench.json", "JSON file for the results")
    progress: bool = F(True, "show progress bars")


# --- machine -----------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch
    import transformers

    info = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_supports_bf16(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        info["amx"] = "amx_bf16" in cpuinfo
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gb"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024 / 1e9, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
            f"bf16 {'yes' if m['cpu_bf16'] else 'no'}{' (AMX)' if m.get('amx') else ''}, "
            f"{m.get('memory_gb', '?')} GB RAM, {'GPU ' + m['gpu'] + ', ' if m.get('gpu') else ''}torch {m['torch']}, "
            f"transformers {m['transformers']}, load average at start {m['load_average_at_start'][0]}")


# --- inputs ------------------------------------------------------------------------------------------------


def as_pairs(rows: list[dict]) -> list[dict]:
    """Pairs as cai.feedback takes them; the better answer is answer_a in every other pair (row order)."""
    pairs = []
    for i, r in enumerate(rows):
        a, b = (r["better"], r["worse"]) if i % 2 == 0 else (r["worse"], r["better"])
        pairs.append({"key": stable_hash(["bench", r["id"], a, b]), "prompt_id": r["id"], "prompt": r["prompt"],
                      "category": r["category"], "answer_a": a, "answer_b": b, "better_is_a": i % 2 == 0})
    return pairs


def label_settings(cfg, template: str, k: int):
    from cai.feedback import LabelSettings  # heavy (imports torch)

    f = FeedbackConfig()
    return LabelSettings(seed=cfg.seed, principles_per_pair=k, conversation_template=load_template(f.conversation_template),
                         template=load_template(template))


def constitutions(cfg) -> dict:
    return {"harmless": load_constitution(cfg.harmless_constitution),
            "helpful": load_constitution(cfg.helpful_constitution)}


def ai_label(pairs: list[dict], cfg, settings, backend) -> tuple[list[dict], dict[str, float]]:
    """cai.feedback.label_pairs on a fresh store, each category with its own constitution.

    Returns the comparisons and every scored prompt's P(option A), by request key."""
    from cai.feedback import label_pairs, label_requests  # heavy (imports torch)

    comps, p_option_a = [], {}
    with tempfile.TemporaryDirectory(prefix="cai-bench-") as tmp:
        store = JsonlStore(Path(tmp) / "steps.jsonl")
        for cat, constitution in constitutions(cfg).items():
            chosen = [p for p in pairs if p["category"] == cat]
            if chosen:
                comps += label_pairs(chosen, constitution, settings, backend, store, Path(tmp) / "plans",
                                     cfg.batch_size, progress=False)[0]
                p_option_a.update({r.key: store[r.key]["p_option_a"]
                                   for r in label_requests(chosen, constitution, settings, backend.identity)})
    return comps, p_option_a


# --- generation ----------------------------------------------------------------------------------------------


def critique_conversations(cfg, n: int) -> list[list[dict]]:
    """Real SL critique requests (cai.critique's templates, few-shot, principle choice) on red-team prompts,
    each critiquing the labeled set's harmful answer."""
    rows = [r for r in load_labeled_set(cfg.labeled_set) if r["category"] == "harmless"]
    if n > len(rows):
        raise CaiError(f"gen_prompts={n}: {cfg.labeled_set} has only {len(rows)} harmless rows")
    c = CritiqueConfig()
    s = ChainSettings(seed=cfg.seed, rounds=1, critique_template=load_template(c.critique_template),
                      revision_template=load_template(c.revision_template),
                      few_shot=load_few_shot(c.few_shot_file, cfg.few_shot), sampling=Sampling(), model_identity="bench")
    principles = constitutions(cfg)["harmless"].critique_revision
    return [critique_request(PromptRecord(r["id"], r["prompt"]), r["worse"], "bench",
                             choose_principle(cfg.seed, r["prompt"], 1, principles), 1, s).conversation
            for r in rows[:n]]


def bench_gen(cfg, fast, naive_model) -> dict:
    import torch

    convs = critique_conversations(cfg, cfg.gen_prompts)
    sampling = Sampling(max_new_tokens=cfg.gen_tokens, temperature=0.7, top_p=0.9)  # the SL demo's sampling
    seeds = [cfg.seed + i for i in range(len(convs))]
    tok = fast.tokenizer
    eos = fast.eos_ids
    fast.eos_ids = set()  # every row makes exactly gen_tokens tokens, as the baseline (min_new_tokens) does
    try:
        fast.generate(convs, Sampling(max_new_tokens=2), seeds)  # warm-up: kernel setup for these shapes
        fast_s, outs = best_of(cfg.repeats, lambda: fast.generate(convs, sampling, seeds))
    finally:
        fast.eos_ids = eos
    fast_tokens = sum(o.completion_tokens for o in outs)

    def naive_one(conv, new_tokens):
        ids = torch.tensor([tok(fast.chat_prompt(conv), add_special_tokens=False)["input_ids"]], device=naive_model.device)
        with torch.inference_mode():
            out = naive_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7,
                                       top_p=0.9, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       pad_token_id=tok.pad_token_id)
        return out.shape[1] - ids.shape[1]

    from tqdm import tqdm

    naive_one(convs[0], 2)  # warm-up
    torch.manual_seed(cfg.seed)
    naive_s, naive_tokens = best_of(cfg.repeats, lambda: sum(
        naive_one(c, cfg.gen_tokens) for c in tqdm(convs, desc="naive generate", disable=not cfg.progress, leave=False)))
    prompt_tokens = [o.prompt_tokens for o in outs]
    fast_rate, naive_rate = fast_tokens / fast_s, naive_tokens / naive_s
    peer = bench_peer(cfg, [fast.chat_prompt(c) for c in convs])
    if "tok_s" in peer:
        peer["ratio"] = fast_rate / peer["tok_s"]  # ours against the peer's: > 1 is faster
    return {"requests": len(convs), "new_tokens": cfg.gen_tokens, "prompt_tokens_mean": sum(prompt_tokens) / len(outs),
            "fast": f"TransformersBackend.generate, batch {fast.batch_size}, {fast.identity.rsplit(':', 1)[1]}",
            "baseline": "HF model.generate, one prompt at a time, batch 1, float32",
            "fast_tokens": fast_tokens, "fast_seconds": fast_s, "fast_tok_s": fast_rate,
            "naive_tokens": naive_tokens, "naive_seconds": naive_s, "naive_tok_s": naive_rate,
            "ratio": fast_rate / naive_rate, "peer": peer}


def bench_peer(cfg, prompts: list[str]) -> dict:
    """The peer figure: llama.cpp (llama-cpp-python, `make peer` builds it from PyPI source) on the bundled model's
    own GGUF file, one prompt at a time, on as many threads as the fast path, with the same chat prompts, sampling
    and number of new tokens (EOS ignored). {"skipped": why} where it cannot run."""
    if not cfg.peer:
        return {"skipped": "peer=false"}
    if cfg.model != "smollm2-135m":
        return {"skipped": f"model={cfg.model} has no GGUF file (the peer runs the bundled smollm2-135m)"}
    try:
        import llama_cpp  # optional: make peer
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (make peer builds it from PyPI source)"}
    import torch
    from tqdm import tqdm

    gguf = smollm2_gguf()
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                          seed=cfg.seed, verbose=False)

    def one(text: str, new_tokens: int) -> int:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        made = 0
        # reset=True keeps what the context shares with the last request (the few-shot prefix): the peer at its best
        for _ in llm.generate(ids, temp=0.7, top_p=0.9, top_k=0, reset=True):
            made += 1
            if made == new_tokens:
                break
        return made

    one(prompts[0], 2)  # warm-up
    seconds, tokens = best_of(cfg.repeats, lambda: sum(
        one(t, cfg.gen_tokens) for t in tqdm(prompts, desc="llama.cpp generate", disable=not cfg.progress,
                                             leave=False)))
    return {"name": f"llama.cpp {llama_cpp.__version__} (llama-cpp-python), one prompt at a time, {threads} threads",
            "weights": gguf.name, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def best_of(n: int, fn):
    """(fastest wall time of n calls, the result of the last call)."""
    best, result = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


# --- labeling ----------------------------------------------------------------------------------------------


def naive_option_logprob(model, tok, prompt: str, option: str) -> float:
    """log p(option | prompt): one forward of prompt+option, batch 1, logits only where the option is read."""
    import torch

    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    full = tok(prompt + option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=len(full) - n + 1).logits[0, :-1].float().cpu()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[j, full[n + j]] for j in range(len(full) - n)))


def bench_label(cfg, fast, naive_model) -> dict:
    from tqdm import tqdm

    from cai.feedback import OPTIONS, label_requests  # heavy (imports torch)
    from cai.losses import preference_probs_from_option_logprobs  # heavy (imports torch)

    pairs = as_pairs(load_labeled_set(cfg.labeled_set)[:cfg.label_pairs])
    settings = label_settings(cfg, cfg.template, cfg.principles)
    ai_label(pairs[:1], cfg, settings, fast)  # warm-up
    before = dict(fast.prefill_tokens)
    fast_s, (_, fast_p) = best_of(cfg.repeats, lambda: ai_label(pairs, cfg, settings, fast))
    forward = (fast.prefill_tokens["forward"] - before["forward"]) // cfg.repeats
    prompt_tokens = (fast.prefill_tokens["prompt"] - before["prompt"]) // cfg.repeats

    requests = []
    for cat, constitution in constitutions(cfg).items():
        requests += label_requests([p for p in pairs if p["category"] == cat], constitution, settings, fast.identity)
    prompts = [fast.chat_prompt(r.conversation) for r in requests]
    naive_option_logprob(naive_model, fast.tokenizer, prompts[0], OPTIONS[0])  # warm-up
    def naive_label():
        naive_p = {}
        for r, p in zip(tqdm(requests, desc="naive label", disable=not cfg.progress, leave=False), prompts):
            la, lb = (naive_option_logprob(naive_model, fast.tokenizer, p, o) for o in OPTIONS)
            naive_p[r.key] = preference_probs_from_option_logprobs(la, lb)
        return naive_p

    naive_s, naive_p = best_of(cfg.repeats, naive_label)
    labels = len(pairs) * cfg.principles  # one soft label per (pair, principle), from both orders
    fast_rate, naive_rate = labels / fast_s, labels / naive_s
    diff = max(abs(fast_p[k] - naive_p[k]) for k in naive_p)
    return {"pairs": len(pairs), "principles": cfg.principles, "labels": labels, "scored_prompts": len(requests),
            "template": cfg.template,
            "fast": f"cai.feedback.label_pairs, batch {cfg.batch_size}, {_dtype(fast.model)}",
            "baseline": "one forward of prompt+letter per option and per order, batch 1, float32",
            "fast_seconds": fast_s, "fast_labels_s": fast_rate, "naive_seconds": naive_s, "naive_labels_s": naive_rate,
            "ratio": fast_rate / naive_rate, "prompt_tokens": prompt_tokens, "forward_tokens": forward,
            "forward_tok_s": forward / fast_s, "mean_prompt_tokens": prompt_tokens / len(requests),
            "max_p_option_a_diff_vs_naive": diff}


# --- roofline ----------------------------------------------------------------------------------------------


def matmul_flops(dtype, n: int, seconds: float = 0.5, device="cpu") -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul on `device`: best of repeated timings for about `seconds`."""
    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(model, context: float) -> tuple[float, str]:
    """Forward FLOPs per token: 2 * non-embedding params + 2 * n_layers * context * d_attn (Kaplan et al. 2020,
    https://arxiv.org/abs/2001.08361 table 1); the vocabulary projection runs for the scored position only."""
    s = model_shape(model)
    value = 2 * s["params_nonembed"] + 2 * s["layers"] * context * s["d_attn"]
    return value, (f"2 x {s['params_nonembed']:,} non-embedding params + 2 x {s['layers']} layers x {context:.0f} "
                   f"context x {s['d_attn']} d_attn (Kaplan et al. 2020)")


def bench_roofline(cfg, fast, label: dict | None) -> dict:
    import torch

    context = label["mean_prompt_tokens"] if label else 256.0
    per_token, formula = flops_per_token(fast.model, context)
    flops = {name: matmul_flops(dt, cfg.matmul_size, device=fast.device)
             for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    roof = {name: f / per_token for name, f in flops.items()}
    out = {"matmul_size": cfg.matmul_size, "matmul_gflop_s": {k: v / 1e9 for k, v in flops.items()},
           "flops_per_token": per_token, "formula": formula, "context": context, "roofline_tok_s": roof}
    if label:
        dt = _dtype(fast.model)
        share = label["forward_tok_s"] / roof[dt]
        # the labeling ratio the same tokens would give at 100% of the roofline, against the same baseline: the most
        # this template and precision allow on this machine
        out.update({"label_dtype": dt, "label_forward_tok_s": label["forward_tok_s"], "label_share": share,
                    "label_ratio_at_roofline": label["ratio"] / share})
    return out


# --- accuracy ----------------------------------------------------------------------------------------------


def bench_accuracy(cfg, fast) -> dict:
    rows = load_labeled_set(cfg.labeled_set)
    pairs = as_pairs(rows[:cfg.accuracy_pairs] if cfg.accuracy_pairs else rows)
    better_is_a = {p["key"]: p["better_is_a"] for p in pairs}
    out = {"pairs": len(pairs), "principles": cfg.principles, "chance": 0.5, "templates": {}}
    for template in [t.strip() for t in cfg.accuracy_templates.split(",") if t.strip()]:
        t = time.perf_counter()
        comps, _ = ai_label(pairs, cfg, label_settings(cfg, template, cfg.principles), fast)

        def stats(cs):
            right = [(c["soft_label"] > 0.5) == better_is_a[c["pair_key"]] and c["soft_label"] != 0.5 for c in cs]
            return {"pairs": len(cs), "accuracy": sum(right) / len(cs),
                    "position_consistency": sum(c["agree"] for c in cs) / len(cs),
                    "mean_p_better": sum(c["soft_label"] if better_is_a[c["pair_key"]] else 1 - c["soft_label"]
                                         for c in cs) / len(cs)}

        out["templates"][template] = {**stats(comps), "seconds": time.perf_counter() - t,
                                      "by_category": {cat: stats([c for c in comps if c["category"] == cat])
                                                      for cat in ("harmless", "helpful")
                                                      if any(c["category"] == cat for c in comps)}}
    return out


# --- PPO (in a subprocess, so its peak RSS is its own) ---------------------------------------------------------


def ppo_variants(cfg) -> list[str]:
    names = [v.strip() for v in cfg.ppo_variants.split(",") if v.strip()]
    if not names or any(v not in PPO_VARIANTS for v in names):
        raise CaiError(f"ppo_variants={cfg.ppo_variants}: expected a comma-separated list of {','.join(PPO_VARIANTS)}")
    return names


def bench_ppo_variants(cfg) -> dict:
    """Each variant in its own subprocess (its peak RSS is its own)."""
    out = {}
    for name in ppo_variants(cfg):
        out[name] = bench_ppo(cfg, PPO_VARIANTS[name])
        print(f"  ppo {name}: peak RSS {out[name]['peak_rss_gb']:.2f} GB, {out[name]['step_seconds_mean']:.1f} s/step",
              flush=True)
    return out


def bench_ppo(cfg, overrides: list[str] = ()) -> dict:
    result = run_ppo_child(cfg, [{"model": cfg.model, "overrides": list(overrides)}])[0]
    steps = result["step_seconds"]
    return {**result, "first_step_seconds": steps[0],
            "step_seconds_mean": sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0]}


def run_ppo_child(cfg, runs: list[dict]) -> list[dict]:
    """PPO runs ({"model", "overrides"} each, one after the other) in one subprocess; a result per run."""
    with tempfile.TemporaryDirectory(prefix="cai-bench-ppo-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"config": cfg.ppo_config, "steps": cfg.ppo_steps, "seed": cfg.seed, "dir": tmp,
                                    "runs": runs}))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ppo-child", str(spec)], capture_output=True,
                              text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"the PPO subprocess failed:\n{proc.stderr[-3000:]}")
        results = json.loads((Path(tmp) / "result.json").read_text())
    return [{**r, "subprocess_seconds": wall} for r in results]


def ppo_child(spec_path: str) -> None:
    """The spec's PPO runs, one after the other (`ppo_run`); their results go to result.json beside the spec."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    results = []
    for i, run in enumerate(spec["runs"]):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        work = Path(spec["dir"]) / f"run-{i}"
        work.mkdir()
        result = ppo_run(run["model"], spec["config"], spec["steps"], spec["seed"], work, run.get("overrides", []))
        # the process's high-water mark so far (KiB on Linux): the ppo section runs one run per subprocess
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB -> GB
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        results.append(result)
    (Path(spec["dir"]) / "result.json").write_text(json.dumps(results))


def ppo_run(model: str, config: str, steps: int, seed: int, work: Path, overrides: list[str]) -> dict:
    """PPO as the RL stage runs it: a PM from the model (fresh scalar head) scores answers, the value model starts
    as the config says, the reference is the starting policy. Returns the time of every step and the settings."""
    import torch

    from cai.train.pm import init_pm, load_pm, score_answers  # heavy (imports torch)
    from cai.train.ppo import run_ppo  # heavy (imports torch)

    cfg = load_config([f"config={config}", f"ppo.steps={steps}", f"ppo.save_every={steps}", "ppo.sample_every=0",
                       *overrides])
    ref = resolve_model(model)
    tok = load_tokenizer(ref)
    pm = init_pm(ref, tok, seed)
    pm.save_pretrained(work / "pm", safe_serialization=True)
    tok.save_pretrained(work / "pm")
    del pm
    pm, pm_tok = load_pm(work / "pm")
    prompts = [p.prompt for p in load_prompts(cfg.red_team) + load_prompts(cfg.helpful)]
    summary = run_ppo(ref, lambda ps, answers: score_answers(pm, pm_tok, ps, answers, batch_size=cfg.pm.batch_size * 2),
                      prompts, cfg.ppo, work / "ppo", Metrics(work / "metrics.jsonl", "rl"),
                      value_init=resolve_model(str(work / "pm")) if cfg.ppo.value_init == "pm" else None,
                      reference=ref, progress=False)
    rows = read_jsonl(work / "metrics.jsonl")
    cumulative = [r["rl/ppo/seconds"] for r in rows if "rl/ppo/seconds" in r]
    step_seconds = [b - a for a, b in zip([0.0] + cumulative, cumulative)]
    answer_lengths = [r["rl/ppo/answer_length"] for r in rows if "rl/ppo/answer_length" in r]
    prompt_lengths = [len(tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=False), add_special_tokens=False)["input_ids"])
                      for p in prompts]
    return {"steps": len(step_seconds), "step_seconds": step_seconds, "bf16": summary.get("bf16"),
            "overrides": overrides, "lora": summary.get("lora"), "value_model": summary.get("value_model"),
            "gradient_checkpointing": summary.get("gradient_checkpointing"),
            "shared_reference": summary.get("shared_reference"), "rollout_batch_size": cfg.ppo.rollout_batch_size,
            "mini_batch_size": cfg.ppo.mini_batch_size, "max_new_tokens": cfg.ppo.max_new_tokens,
            "prompt_tokens_mean": sum(prompt_lengths) / len(prompt_lengths),
            "answer_tokens_mean": sum(answer_lengths) / len(answer_lengths), "torch_threads": torch.get_num_threads(),
            # PPO's own account (cai.train.ppo.mark_phase): the phase that reached the peak, and the most resident
            # at the end of each phase over the steps (GiB; the bench's peak_rss_gb also counts making the PM)
            "peak_phase": summary.get("peak_rss_phase"), "phase_rss_gib": phase_rss(rows),
            "first_step_phase_rss_gib": phase_rss([r for r in rows if r.get("step") == 1][:1])}


def phase_rss(rows: list[dict]) -> dict[str, float]:
    """phase -> the largest resident set (GiB) logged at its end over these PPO metrics rows (the first step's
    alone shows what comes before any update; a later step can still hold an update's freed buffers)."""
    out: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("rl/ppo/rss_gib/"):
                phase = k[len("rl/ppo/rss_gib/"):]
                out[phase] = max(out.get(phase, 0.0), v)
    return out


# --- scaling: throughput and PPO step time against batch size, prompt length and model width ----------------------

SCALING_LISTS = ("scaling_batches", "scaling_prompt_lengths", "scaling_widths", "scaling_ppo_batches")
THROUGHPUT_FEATURES = ("passes", "weight_bytes", "flops", "sampled")  # cost model of a generate / scoring call
PPO_FEATURES = ("one", "params", "param_tokens")  # the cost model of one PPO step


def int_list(cfg, name: str) -> list[int]:
    """A comma-separated setting of whole numbers >= 1, in its order, repeats dropped."""
    raw = str(getattr(cfg, name))
    try:
        values = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise CaiError(f"{name}={raw}: expected a comma-separated list of whole numbers >= 1, e.g. 1,4,16")
    return list(dict.fromkeys(values))


def chat_text(tok, content: str) -> str:
    """A one-turn user conversation as the backends prompt it (cai's chat prompts: the generation prompt added)."""
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def scaling_plan(cfg) -> dict:
    """The scaling section's settings, checked before any work starts: the size lists, widths the tiny preset can
    take, prompt lengths that leave room for text inside the chat template, the PPO settings at each rollout batch
    size. Returns the lists by setting name, the sweeps' model, the PPO overrides per rollout batch size and the
    text prompts are cut from (the labeled set's prompts and answers)."""
    plan = {name: int_list(cfg, name) for name in SCALING_LISTS}
    for h in plan["scaling_widths"]:
        try:
            tiny_config(h)
        except CaiError as e:
            raise CaiError(f"scaling_widths={cfg.scaling_widths}: {e}") from None
    plan["model"] = cfg.scaling_model or cfg.model
    lengths = [("scaling_prompt_lengths", cfg.scaling_prompt_lengths, plan["scaling_prompt_lengths"]),
               ("scaling_prompt_length", cfg.scaling_prompt_length, [cfg.scaling_prompt_length])]
    for model in dict.fromkeys([plan["model"], "tiny"]):  # the sweeps' model; the width sweep's tokenizer
        overhead = n_tokens(tok := load_tokenizer(resolve_model(model)), chat_text(tok, ""))
        for name, raw, values in lengths:
            if min(values) <= overhead:
                raise CaiError(f"{name}={raw}: {min(values)} tokens leaves no room for a prompt inside {model}'s "
                               f"chat template ({overhead} tokens); expected lengths > {overhead}")
    mini = load_config([f"config={cfg.ppo_config}"]).ppo.mini_batch_size
    plan["ppo_overrides"] = {b: [f"ppo.rollout_batch_size={b}", f"ppo.mini_batch_size={min(b, mini)}"]
                             for b in plan["scaling_ppo_batches"]}
    for overrides in plan["ppo_overrides"].values():  # the settings the PPO runs will load, checked now
        load_config([f"config={cfg.ppo_config}", *overrides])
    plan["text"] = "\n\n".join(t for r in load_labeled_set(cfg.labeled_set) for t in (r["prompt"], r["better"], r["worse"]))
    return plan


def synthetic_prompts(tok, text: str, n: int, length: int) -> list[list[dict]]:
    """n one-turn conversations whose chat prompts are `length` tokens (give or take a token where the cut text
    re-tokenizes differently): slices of `text` (cycled) at n evenly spaced offsets, so the rows share nothing
    but the chat template's own prefix."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    k = length - n_tokens(tok, chat_text(tok, ""))
    step = max(1, len(ids) // n)
    return [[{"role": "user", "content": tok.decode([ids[(i * step + j) % len(ids)] for j in range(k)])}]
            for i in range(n)]


class ForwardCounter:
    """Counts what a model's forward passes compute while attached: passes, tokens in, rows that go through the
    vocabulary projection and attended (query, key) position pairs (padded width), for the cost model."""

    def __init__(self, model):
        self.passes = self.tokens = self.logit_rows = self.attended = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        rows, q = ids.shape
        mask = kwargs.get("attention_mask")
        keep = int(kwargs.get("logits_to_keep") or q)  # 0 / absent: every position
        self.passes += 1
        self.tokens += rows * q
        self.logit_rows += rows * min(keep, q)
        self.attended += rows * q * (mask.shape[1] if mask is not None else q)

    def close(self) -> None:
        self._handle.remove()


def model_shape(model) -> dict:
    """What the cost model needs of a model: parameters (all; outside the embeddings), the vocabulary projection's
    size, layers, attention width, and the bytes of weights one forward pass reads."""
    c = model.config
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    nonembed = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    head = model.get_output_embeddings().weight.numel()
    return {"params": sum(p.numel() for p in model.parameters()), "params_nonembed": nonembed, "head": head,
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "d_attn": c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
            "pass_bytes": (nonembed + head) * next(model.parameters()).element_size()}


def throughput_features(shape: dict, passes: float, tokens: float, logit_rows: float, attended: float,
                        sampled: float) -> dict:
    """The cost model's inputs for forward passes that computed this much: passes, bytes of weights read (every
    weight once a pass), FLOPs (2 per weight per token, the vocabulary projection for the rows that need it,
    attention as Kaplan et al. 2020 table 1 counts it: 2 x layers x d_attn per attended position pair) and tokens
    sampled (each a softmax and a top-256 over the vocabulary, on the CPU)."""
    return {"passes": passes, "weight_bytes": passes * shape["pass_bytes"],
            "flops": 2 * shape["params_nonembed"] * tokens + 2 * shape["head"] * logit_rows
                     + 2 * shape["layers"] * shape["d_attn"] * attended, "sampled": sampled}


def predicted_counts(kind: str, batch: int, length: int, new_tokens: int) -> tuple[int, ...]:
    """(passes, tokens, logit rows, attended pairs, sampled tokens) of one batch, counted as the backend runs it
    without shared prefixes: generation is a prefill and new_tokens - 1 decode steps; option scoring a prefill."""
    if kind == "label":
        return 1, batch * length, batch, batch * length * length, 0
    decode = new_tokens - 1
    return (1 + decode, batch * (length + decode), batch * new_tokens,
            batch * (length * length + sum(length + j for j in range(1, decode + 1))), batch * new_tokens)


def scaling_measure(backend, kind: str, batch: int, length: int, cfg, text: str) -> dict:
    """One batch of `batch` prompts of `length` tokens through the backend: generation (kind=generate:
    scaling_new_tokens each, EOS ignored, the SL demo's sampling) or option scoring (kind=label: both letters from
    one forward, as the labeler scores them; a label is the two orders of one question, so labels = prompts / 2).
    Timed (fastest of `repeats`), with what its forward passes computed (the counts of one call)."""
    from cai.feedback import OPTIONS  # heavy (imports torch)

    convs = synthetic_prompts(backend.tokenizer, text, batch, length)
    prompts = [backend.chat_prompt(c) for c in convs]
    saved = backend.batch_size, backend.eos_ids
    backend.batch_size, backend.eos_ids = batch, set()  # one batch; every row makes exactly new_tokens tokens
    counter = ForwardCounter(backend.model)
    try:
        if kind == "generate":
            sampling = Sampling(max_new_tokens=cfg.scaling_new_tokens, temperature=0.7, top_p=0.9)
            seconds, outs = best_of(cfg.repeats, lambda: backend.generate(convs, sampling, list(range(batch))))
            done = sum(o.completion_tokens for o in outs)
        else:
            seconds, _ = best_of(cfg.repeats, lambda: backend.option_logprobs(prompts, list(OPTIONS)))
            done = batch / 2
    finally:
        counter.close()
        backend.batch_size, backend.eos_ids = saved
    shape = model_shape(backend.model)
    counts = {k: getattr(counter, k) / cfg.repeats for k in ("passes", "tokens", "logit_rows", "attended")}
    counts["sampled"] = done if kind == "generate" else 0
    return {"kind": kind, "batch": batch, "prompt_length": length,
            "prompt_tokens_mean": sum(n_tokens(backend.tokenizer, p) for p in prompts) / batch,
            "new_tokens": cfg.scaling_new_tokens if kind == "generate" else 0, "seconds": seconds,
            "rate": done / seconds, "unit": "tok/s" if kind == "generate" else "labels/s",
            "hidden_size": shape["hidden_size"], "params": shape["params"],
            "params_nonembed": shape["params_nonembed"], "dtype": _dtype(backend.model), **counts,
            **throughput_features(shape, **counts)}


def fit_nonnegative(rows: list[dict], features: tuple[str, ...], target: str = "seconds") -> dict:
    """Least squares of target ~ sum_k c_k * feature_k with every c_k >= 0, on relative errors (each row divided
    by its target, so a 10 ms and a 10 s measurement weigh alike).

    Every subset of the features is solved by its normal equations and the best fit without a negative
    coefficient wins: the exact non-negative least-squares solution (its nonzero coefficients are the
    unconstrained fit on their subset), found by enumeration, which is cheap for a handful of features.
    Returns {"coefficients": {feature: c}, "rms_rel_error", "max_rel_error", "rows"}."""
    import itertools

    k = len(features)
    x = [[r[f] / r[target] for f in features] for r in rows]
    scale = [max(abs(row[j]) for row in x) or 1.0 for j in range(k)]  # columns of similar size: a stable solve
    xs = [[row[j] / scale[j] for j in range(k)] for row in x]
    best = None
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            c = _normal_equations([[row[j] for j in subset] for row in xs], [1.0] * len(xs))
            if c is None or min(c) < 0:
                continue
            coef = [0.0] * k
            for j, v in zip(subset, c):
                coef[j] = v / scale[j]
            errors = [sum(coef[j] * row[j] for j in range(k)) - 1.0 for row in x]  # predicted / measured - 1
            sse = sum(e * e for e in errors)
            if best is None or sse < best[0]:
                best = (sse, coef, errors)
    if best is None:
        raise ValueError(f"no non-negative fit of {target} on {features}")
    _, coef, errors = best
    return {"coefficients": dict(zip(features, coef)), "rms_rel_error": (best[0] / len(errors)) ** 0.5,
            "max_rel_error": max(abs(e) for e in errors), "rows": len(rows)}


def _normal_equations(a: list[list[float]], y: list[float]) -> list[float] | None:
    """argmin |a c - y|^2 by the normal equations (Gaussian elimination, partial pivoting); None when singular."""
    k = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(k)] + [sum(r[i] * v for r, v in zip(a, y))] for i in range(k)]
    tiny = 1e-12 * max(m[i][i] for i in range(k))
    for col in range(k):
        pivot = max(range(col, k), key=lambda i: abs(m[i][col]))
        if abs(m[pivot][col]) <= tiny:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for i in range(k):
            if i != col:
                f = m[i][col] / m[col][col]
                m[i] = [u - f * v for u, v in zip(m[i], m[col])]
    return [m[i][k] / m[i][i] for i in range(k)]


def predict(fit: dict, row: dict) -> float:
    return sum(c * row[f] for f, c in fit["coefficients"].items())


def bench_scaling(cfg, plan: dict, fast) -> dict:
    """Generation and labeling on prompts of set lengths (`synthetic_prompts`) through the backend's own paths,
    against batch size and prompt length on the sweeps' model and against width on the tiny preset widened; PPO
    step time against rollout batch size and width; a cost model fitted on each; the plot."""
    rows, shapes, paths = scaling_throughput(cfg, plan, fast)
    throughput_fit = fit_nonnegative(rows, THROUGHPUT_FEATURES)
    for r in rows:
        r["predicted_seconds"] = predict(throughput_fit, r)
    ppo_rows = scaling_ppo(cfg, plan, shapes, paths)
    ppo_fit = fit_nonnegative(ppo_rows, PPO_FEATURES, target="step_seconds")
    for r in ppo_rows:
        r["predicted_seconds"] = predict(ppo_fit, r)

    big, l0, n = 4 * max(plan["scaling_batches"]), cfg.scaling_prompt_length, cfg.scaling_new_tokens
    prediction = {"model": plan["model"], "batch": big, "prompt_length": l0, "new_tokens": n}
    for kind in ("generate", "label"):
        seconds = predict(throughput_fit, throughput_features(shapes[plan["model"]],
                                                              *predicted_counts(kind, big, l0, n)))
        prediction[kind] = (big * n if kind == "generate" else big / 2) / seconds if seconds > 0 else None
    out = {"model": plan["model"], "batch": cfg.scaling_batch, "prompt_length": l0, "new_tokens": n,
           "widths": plan["scaling_widths"], "rows": rows, "ppo": ppo_rows,
           "fit": {"throughput": throughput_fit, "ppo": ppo_fit}, "prediction": prediction}
    plot = scaling_plot_path(cfg)
    write_atomic(plot, scaling_svg(out))
    out["plot"] = str(plot)
    return out


def scaling_throughput(cfg, plan: dict, fast) -> tuple[list[dict], dict, dict]:
    """The generation and labeling rows: the batch and prompt-length sweeps on the sweeps' model (the bench's own
    backend when it is the same model), then each width. A point two sweeps share is measured once. Returns the
    rows, each model's shape (by sweep model name and by width) and each width's model directory."""
    import gc

    from cai.backends.transformers_backend import TransformersBackend  # heavy (imports torch)
    from cai.feedback import OPTIONS  # heavy (imports torch)

    b0, l0 = cfg.scaling_batch, cfg.scaling_prompt_length
    rows: dict[tuple, dict] = {}
    shapes, paths = {}, {}
    ref = resolve_model(plan["model"])
    models = [(plan["model"], ref, [("batch", b, l0) for b in plan["scaling_batches"]]
               + [("prompt_length", b0, length) for length in plan["scaling_prompt_lengths"]])]
    for h in plan["scaling_widths"]:
        paths[h] = str(tiny_dir(hidden_size=h))
        models.append((h, resolve_model(paths[h]), [("width", b0, l0)]))
    for name, model_ref, points in models:
        reuse = fast is not None and fast.ref.identity == model_ref.identity
        backend = fast if reuse else TransformersBackend(model_ref, dtype=cfg.dtype, device=cfg.device, progress=False)
        # warm-up (kernel and allocator set-up), outside the timings
        conv = synthetic_prompts(backend.tokenizer, plan["text"], 1, l0)
        backend.generate(conv, Sampling(max_new_tokens=2), [0])
        backend.option_logprobs([backend.chat_prompt(conv[0])], list(OPTIONS))
        shapes[name] = model_shape(backend.model)
        label = name if isinstance(name, str) else f"tiny-w{name}"
        for kind in ("generate", "label"):
            for sweep, batch, length in points:
                key = (model_ref.identity, kind, batch, length)
                if key not in rows:
                    rows[key] = {"model": label, "sweeps": [],
                                 **scaling_measure(backend, kind, batch, length, cfg, plan["text"])}
                    print(f"  scaling {kind} {label} batch {batch} prompt {rows[key]['prompt_tokens_mean']:.0f}: "
                          f"{rows[key]['rate']:,.2f} {rows[key]['unit']}", flush=True)
                rows[key]["sweeps"].append(sweep)
        if not reuse:
            del backend
            gc.collect()
    return list(rows.values()), shapes, paths


def scaling_ppo(cfg, plan: dict, shapes: dict, paths: dict) -> list[dict]:
    """PPO at each rollout batch size on each width, in one subprocess: seconds per step after the first."""
    runs = [(h, b) for h in plan["scaling_widths"] for b in plan["scaling_ppo_batches"]]
    print(f"  scaling ppo: {len(runs)} runs of {cfg.ppo_steps} steps in a subprocess", flush=True)
    results = run_ppo_child(cfg, [{"model": paths[h], "overrides": plan["ppo_overrides"][b]} for h, b in runs])
    rows = []
    for (h, b), res in zip(runs, results):
        steps = res["step_seconds"]
        tokens = b * (res["prompt_tokens_mean"] + res["answer_tokens_mean"])
        rows.append({"hidden_size": h, "params": shapes[h]["params"], "rollout_batch": b,
                     "mini_batch_size": res["mini_batch_size"], "ppo_steps": res["steps"],
                     "first_step_seconds": steps[0],
                     "step_seconds": sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0],
                     "rollout_tokens": tokens, "bf16": res["bf16"], "one": 1.0,
                     "param_tokens": shapes[h]["params"] * tokens})
    return rows


def scaling_plot_path(cfg) -> Path:
    if cfg.scaling_plot:
        return Path(cfg.scaling_plot)
    out = Path(cfg.out)
    return out.with_name(out.name.removesuffix(".json") + ".scaling.svg")


def scaling_svg(s: dict) -> str:
    """The scaling section's four log-log panels: throughput against batch size, prompt length and width; PPO
    step time against width, one line per rollout batch size."""
    names = {"generate": "generation, new tokens/s", "label": "labeling, labels/s"}

    def lines(sweep: str, x: str) -> list[dict]:
        return [{"name": name, "points": sorted((r[x], r["rate"]) for r in s["rows"]
                                                if r["kind"] == kind and sweep in r["sweeps"])}
                for kind, name in names.items()]

    ppo_batches = list(dict.fromkeys(r["rollout_batch"] for r in s["ppo"]))
    return svg_loglog([
        {"title": f"{s['model']}: vs batch size (prompts of {s['prompt_length']} tokens)", "x": "batch size",
         "y": "per second", "series": lines("batch", "batch")},
        {"title": f"{s['model']}: vs prompt length (batch {s['batch']})", "x": "prompt tokens",
         "y": "per second", "series": lines("prompt_length", "prompt_length")},
        {"title": f"tiny preset widened: vs width (batch {s['batch']}, {s['prompt_length']} tokens)",
         "x": "hidden size", "y": "per second", "series": lines("width", "hidden_size")},
        {"title": "tiny preset widened: PPO step time vs width", "x": "hidden size", "y": "seconds per step",
         "series": [{"name": f"rollout batch {b}", "points": sorted((r["hidden_size"], r["step_seconds"])
                                                                   for r in s["ppo"] if r["rollout_batch"] == b)}
                    for b in ppo_batches]},
    ], title=f"make bench, scaling section: {s['new_tokens']} new tokens per answer; lines join measurements")


SVG_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def log_ticks(lo: float, hi: float, data: list[float], at_data: bool) -> list[float]:
    """Ticks of a log axis spanning [lo, hi]: with at_data, the data's own values when there are at most six of
    them (batch sizes, widths); else 1-2-5 steps (powers of ten alone when those are too many), with the data's
    extremes added when fewer than two steps fall in the range."""
    import math

    values = sorted(set(data))
    if at_data and len(values) <= 6:
        return values
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    if len(ticks) > 8:
        ticks = [t for t in ticks if f"{t:.0e}".startswith("1")]
    return ticks if len(ticks) >= 2 else sorted(set(ticks + [values[0], values[-1]]))


def tick_label(v: float) -> str:
    if v == int(v) and abs(v) < 1e4:
        return str(int(v))
    for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g}{suffix}"
    return f"{v:.3g}"


def svg_loglog(panels: list[dict], title: str = "", columns: int = 2) -> str:
    """Log-log line charts as one self-contained SVG, no plotting library: panels = [{"title", "x", "y" (axis
    labels), "series": [{"name", "points": [(x, y), ...]}]}], laid out `columns` to a row. Each series is a
    polyline (class "series") with a dot per point; each panel has ticks on both axes and a legend on its right.
    Points with x or y <= 0 cannot be drawn on a log axis and are left out."""
    import math
    from xml.sax.saxutils import escape, quoteattr

    pw, ph = 560, 320  # panel size
    left, right, top, bottom = 62, 190, 34, 48  # plot area margins inside a panel; the legend sits on the right
    head = 30 if title else 0
    rows_n = -(-len(panels) // columns)
    width, height = pw * min(columns, len(panels)), head + ph * rows_n
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="10" y="20" font-size="13">{escape(title)}</text>')
    for n, panel in enumerate(panels):
        ox, oy = pw * (n % columns), head + ph * (n // columns)
        x0, x1, y0, y1 = left, pw - right, top, ph - bottom  # plot area, in panel coordinates
        series = [[(x, y) for x, y in s["points"] if x > 0 and y > 0] for s in panel["series"]]
        xs = [x for pts in series for x, _ in pts] or [1.0]
        ys = [y for pts in series for _, y in pts] or [1.0]

        def span(values):  # log range with a margin; a single value gets a factor of 2 either side
            lo, hi = min(values), max(values)
            pad = 0.08 * (math.log10(hi) - math.log10(lo)) or math.log10(2)
            return 10 ** (math.log10(lo) - pad), 10 ** (math.log10(hi) + pad)

        (xlo, xhi), (ylo, yhi) = span(xs), span(ys)

        def px(x, lo=xlo, hi=xhi):
            return x0 + (x1 - x0) * (math.log10(x) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

        def py(y, lo=ylo, hi=yhi):
            return y1 - (y1 - y0) * (math.log10(y) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

        out.append(f'<g class="panel" transform="translate({ox},{oy})">')
        out.append(f'<text x="{x0}" y="20" font-size="12" font-weight="bold">{escape(panel["title"])}</text>')
        for t in log_ticks(xlo, xhi, xs, at_data=True):
            out.append(f'<line x1="{px(t):.1f}" y1="{y0}" x2="{px(t):.1f}" y2="{y1}" stroke="#e4e4e4"/>'
                       f'<line x1="{px(t):.1f}" y1="{y1}" x2="{px(t):.1f}" y2="{y1 + 4}" stroke="#444"/>'
                       f'<text x="{px(t):.1f}" y="{y1 + 16}" text-anchor="middle">{tick_label(t)}</text>')
        for t in log_ticks(ylo, yhi, ys, at_data=False):
            out.append(f'<line x1="{x0}" y1="{py(t):.1f}" x2="{x1}" y2="{py(t):.1f}" stroke="#e4e4e4"/>'
                       f'<line x1="{x0 - 4}" y1="{py(t):.1f}" x2="{x0}" y2="{py(t):.1f}" stroke="#444"/>'
                       f'<text x="{x0 - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{tick_label(t)}</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#444"/>')
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{ph - 12}" text-anchor="middle">{escape(panel["x"])} '
                   '(log)</text>')
        out.append(f'<text transform="translate(14,{(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle">'
                   f'{escape(panel["y"])} (log)</text>')
        for i, (s, pts) in enumerate(zip(panel["series"], series)):
            color = SVG_COLORS[i % len(SVG_COLORS)]
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline class="series" data-name={quoteattr(s["name"])} points="{coords}" fill="none" '
                       f'stroke="{color}" stroke-width="1.8"/>')
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
            ly = y0 + 8 + 18 * i
            out.append(f'<g class="legend"><line x1="{x1 + 12}" y1="{ly}" x2="{x1 + 34}" y2="{ly}" stroke="{color}" '
                       f'stroke-width="1.8"/><text x="{x1 + 40}" y="{ly + 4}">{escape(s["name"])}</text></g>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- make demo ---------------------------------------------------------------------------------------------


def bench_demo(cfg) -> dict:
    """The commands of `make demo`, on a fresh run; output goes to a log file beside the run."""
    import shutil

    from tqdm import tqdm

    runs_dir = Path(cfg.demo_runs_dir) if cfg.demo_runs_dir else Path(tempfile.mkdtemp(prefix="cai-bench-demo-"))
    run = f"bench-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    where = [f"runs_dir={runs_dir}", f"run={run}"]
    parts = [("constitution check", ["-m", "cai.constitution", "check", "constitutions/default.yaml",
                                     "constitutions/helpful_honest.yaml"]),
             ("sl", ["-m", "cai.pipeline", "config=pipelines/demo_sl.yaml", *where]),
             ("rl", ["-m", "cai.pipeline", "config=pipelines/demo_rl.yaml", *where]),
             ("dpo", ["-m", "cai.pipeline", "config=pipelines/demo_dpo.yaml", *where])]
    models = ["smollm2-135m", *(str(runs_dir / run / m) for m in ("sl/model", "rl/round-1/policy", "rl/dpo/policy"))]
    parts.append(("evaluate", ["-m", "cai.evaluate", f"models=[{','.join(models)}]",
                               "sets=[prompts/sets/red_team_eval.jsonl,prompts/sets/helpful_eval.jsonl]",
                               "prompts.limit=16", "sampling.max_new_tokens=64", f"out={runs_dir / run / 'eval'}"]))
    runs_dir.mkdir(parents=True, exist_ok=True)
    log = runs_dir / f"{run}.log"
    seconds = {}
    with open(log, "w") as f:
        for name, args in tqdm(parts, desc="make demo", unit="part", disable=not cfg.progress):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT)
            seconds[name] = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"demo section: '{name}' failed (exit {proc.returncode}); see {log}")
    result = {"seconds": seconds, "total_seconds": sum(seconds.values()), "total_minutes": sum(seconds.values()) / 60,
              "log": str(log)}
    if not cfg.demo_runs_dir:
        shutil.rmtree(runs_dir, ignore_errors=True)
        result["log"] = None
    return result


# --- the run -----------------------------------------------------------------------------------------------


def _dtype(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def targets(r: dict) -> list[dict]:
    """(name, value, target, met) rows of issue 6, for the sections that ran."""
    rows = []

    def add(name, value, op, goal, unit=""):
        rows.append({"name": name, "value": value, "target": f"{op} {goal}{unit}",
                     "met": value >= goal if op == ">=" else value <= goal})

    if "gen" in r:
        add("generation vs naive (x)", r["gen"]["ratio"], ">=", 15)
    if "label" in r:
        add("labeling vs naive (x)", r["label"]["ratio"], ">=", 10)
    if "label_share" in r.get("roofline", {}):
        add(f"labeling share of {r['roofline']['label_dtype']} roofline", r["roofline"]["label_share"], ">=", 0.6)
    for name, p in r.get("ppo", {}).items():
        label = "LoRA" if name == "lora" else name
        add(f"PPO peak RSS, {label} (GB)", p["peak_rss_gb"], "<=", 3 if p["lora"] else 6)  # GB = 1e9 bytes
    if "demo" in r:
        add("make demo (minutes)", r["demo"]["total_minutes"], "<=", 10)
    return rows


def run_bench(cfg) -> dict:
    from cai.backends.transformers_backend import TransformersBackend, configure_cpu_threads  # heavy (imports torch)

    sections = [s.strip() for s in cfg.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise CaiError(f"sections={cfg.sections}: expected a comma-separated list of {','.join(SECTIONS)}")
    for name in ("gen_prompts", "gen_tokens", "label_pairs", "principles", "batch_size", "ppo_steps", "matmul_size",
                 "repeats"):
        if getattr(cfg, name) < 1:
            raise CaiError(f"{name}={getattr(cfg, name)}: expected 1 or more")
    if "ppo" in sections:
        ppo_variants(cfg)
    plan = scaling_plan(cfg) if "scaling" in sections else None
    if any(s in sections for s in ("gen", "label", "accuracy")):  # inputs are checked before any model loads
        load_labeled_set(cfg.labeled_set)
        constitutions(cfg)
        if "gen" in sections:
            critique_conversations(cfg, cfg.gen_prompts)  # enough red-team rows for gen_prompts
        for t in [cfg.template, *cfg.accuracy_templates.split(",")]:
            label_settings(cfg, t.strip(), cfg.principles)
    configure_cpu_threads()  # the same threads for the fast paths and the baselines
    results: dict = {"machine": machine(), "model": cfg.model, "sections": sections}
    print(f"machine: {describe(results['machine'])}")
    needs_models = any(s in sections for s in ("gen", "label", "roofline", "accuracy"))
    fast = naive = None
    if needs_models:
        ref = resolve_model(cfg.model)
        before = resident_gb()
        fast = TransformersBackend(ref, dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size, progress=False)
        if before is not None:  # what the fast path's own model holds: its weights in each form it computes from
            results["backend_resident_gb"] = resident_gb() - before
        if "gen" in sections or "label" in sections:
            naive = load_causal_lm(ref, "float32", cfg.device)
    for section in SECTIONS:
        if section not in sections:
            continue
        print(f"[{section}] ...", flush=True)
        t = time.perf_counter()
        if section == "gen":
            results["gen"] = bench_gen(cfg, fast, naive)
        elif section == "label":
            results["label"] = bench_label(cfg, fast, naive)
        elif section == "roofline":
            results["roofline"] = bench_roofline(cfg, fast, results.get("label"))
        elif section == "accuracy":
            results["accuracy"] = bench_accuracy(cfg, fast)
        elif section == "ppo":
            results["ppo"] = bench_ppo_variants(cfg)
        elif section == "scaling":
            results["scaling"] = bench_scaling(cfg, plan, fast)
        elif section == "demo":
            results["demo"] = bench_demo(cfg)
        print(f"[{section}] done in {time.perf_counter() - t:.1f} s", flush=True)
    results["targets"] = targets(results)
    return results


def resident_gb() -> float | None:
    """This process's resident set now (GB, after a garbage collection), from /proc; None where there is none."""
    import gc

    gc.collect()
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        return None


def print_report(r: dict) -> None:

    f = lambda v, d=1: f"{v:,.{d}f}"  # noqa: E731
    print(f"\nmodel {r['model']} on {describe(r['machine'])}")
    if "backend_resident_gb" in r:
        print(f"fast path's model resident: {r['backend_resident_gb']:.2f} GB (RSS after loading it minus before)")
    if "gen" in r:
        g = r["gen"]
        print(f"generation: {g['requests']} critique requests x {g['new_tokens']} new tokens (mean prompt "
              f"{g['prompt_tokens_mean']:.0f} tokens): {f(g['fast_tok_s'])} tok/s ({g['fast']}) vs "
              f"{f(g['naive_tok_s'])} tok/s ({g['baseline']}) = {g['ratio']:.2f}x")
        peer = g.get("peer", {})
        print(f"  peer: {f(peer['tok_s'])} tok/s ({peer['name']}, {peer['weights']}); ours / peer = "
              f"{peer['ratio']:.2f}x" if "tok_s" in peer else f"  peer: skipped ({peer.get('skipped', '?')})")
    if "label" in r:
        lb = r["label"]
        print(f"labeling: {lb['pairs']} pairs x {lb['principles']} principles x 2 orders = {lb['scored_prompts']} "
              f"prompts (mean {lb['mean_prompt_tokens']:.0f} tokens): {f(lb['fast_labels_s'], 2)} labels/s "
              f"({lb['fast']}) vs {f(lb['naive_labels_s'], 2)} labels/s ({lb['baseline']}) = {lb['ratio']:.2f}x; "
              f"{lb['forward_tokens']:,} of {lb['prompt_tokens']:,} prompt tokens run through the model; "
              f"max |P(A) fast - naive| {lb['max_p_option_a_diff_vs_naive']:.4f}")
    if "roofline" in r:
        rf = r["roofline"]
        gf = rf["matmul_gflop_s"]
        print(f"roofline: {rf['matmul_size']}^2 matmul {f(gf['bfloat16'], 0)} GFLOP/s bf16, {f(gf['float32'], 0)} "
              f"GFLOP/s fp32; {rf['flops_per_token'] / 1e6:.1f} MFLOP/token = {rf['formula']}; roofline "
              f"{f(rf['roofline_tok_s']['bfloat16'], 0)} tok/s bf16, {f(rf['roofline_tok_s']['float32'], 0)} fp32"
              + (f"; labeling forward {f(rf['label_forward_tok_s'], 0)} tok/s = {rf['label_share']:.0%} of the "
                 f"{rf['label_dtype']} roofline (at 100% of it, labeling would be {rf['label_ratio_at_roofline']:.1f}x "
                 "naive)" if "label_share" in rf else ""))
    if "accuracy" in r:
        a = r["accuracy"]
        print(f"accuracy on {a['pairs']} labeled pairs, {a['principles']} principles each (chance 0.5):")
        print(table([(t, f"{s['accuracy']:.3f}", f"{s['position_consistency']:.3f}", f"{s['mean_p_better']:.3f}",
                      *(f"{s['by_category'].get(c, {}).get('accuracy', float('nan')):.3f}" for c in ("harmless", "helpful")))
                     for t, s in a["templates"].items()],
                    ("template", "accuracy", "position consistency", "mean P(better)", "harmless", "helpful")))
    for name, p in r.get("ppo", {}).items():
        print(f"PPO {name} ({p['value_model']} value, {'LoRA' if p['lora'] else 'full'}, reference "
              f"{'= policy with adapters off' if p['shared_reference'] else 'a second copy'}"
              f"{', activations recomputed' if p.get('gradient_checkpointing') else ''}): {p['steps']} steps of "
              f"{p['rollout_batch_size']} rollouts x <= {p['max_new_tokens']} tokens: {p['step_seconds_mean']:.1f} "
              f"s/step after the first ({p['first_step_seconds']:.1f} s incl. loading), peak RSS "
              f"{p['peak_rss_gb']:.2f} GB" + (f", GPU peak {p['gpu_peak_gb']:.2f} GB allocated"
                                              if p.get("gpu_peak_gb") is not None else ""))
        if p.get("phase_rss_gib"):
            print("  resident at the end of each phase (GiB, most over the steps): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in p["phase_rss_gib"].items())
                  + (f"; the peak was reached in: {p['peak_phase']}" if p.get("peak_phase") else ""))
            print("  the same in the first step alone: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in p.get("first_step_phase_rss_gib", {}).items()))
    if "scaling" in r:
        print_scaling(r["scaling"])
    if "demo" in r:
        d = r["demo"]
        print("make demo: " + ", ".join(f"{k} {v:.0f} s" for k, v in d["seconds"].items())
              + f"; total {d['total_minutes']:.1f} min")
    if r["targets"]:
        print("\n" + table([(t["name"], f"{t['value']:.2f}", t["target"], "met" if t["met"] else "NOT met")
                            for t in r["targets"]], ("measure", "value", "target", "")))


def print_scaling(s: dict) -> None:
    """The scaling section's tables, its two cost models and how to read them."""

    def ratio(r):
        return f"{r['seconds' if 'seconds' in r else 'step_seconds'] / r['predicted_seconds']:.2f}" \
            if r["predicted_seconds"] > 0 else "-"

    print(f"\nscaling: generation ({s['new_tokens']} new tokens per answer, EOS ignored) and labeling (both letters "
          "from one forward; a label = a question in both orders = 2 scored prompts), one batch of prompts cut to "
          "length from the labeled set per row:")
    print(table([(r["kind"], ",".join(r["sweeps"]), r["model"], r["hidden_size"], f"{r['params'] / 1e6:.2f}M",
                  r["batch"], f"{r['prompt_tokens_mean']:.0f}", f"{r['seconds']:.3f}", f"{r['rate']:,.2f} {r['unit']}",
                  f"{r['passes']:.0f}", f"{r['flops'] / 1e9:,.3f}", ratio(r)) for r in s["rows"]],
                ("measure", "sweep", "model", "width", "params", "batch", "prompt tok", "seconds", "rate", "passes",
                 "GFLOP", "measured/fit")))
    fit = s["fit"]["throughput"]
    c = fit["coefficients"]
    terms = [f"forward passes x {c['passes'] * 1e3:.3g} ms" if c["passes"] else "0 x forward passes",
             f"weight bytes read / {1 / c['weight_bytes'] / 1e9:.3g} GB/s" if c["weight_bytes"] else "0 x weight bytes",
             f"FLOPs / {1 / c['flops'] / 1e9:.3g} GFLOP/s" if c["flops"] else "0 x FLOPs",
             f"sampled tokens x {c['sampled'] * 1e3:.3g} ms" if c["sampled"] else "0 x sampled tokens"]
    print(f"cost model of generation and labeling (least squares on relative error over the {fit['rows']} rows, "
          f"coefficients >= 0; a 0 term is one these rows do not need):\n  seconds = {' + '.join(terms)}"
          f"  (rms error {fit['rms_rel_error']:.0%}, worst {fit['max_rel_error']:.0%}: the measured/fit column)")
    print("  how to read: every forward pass costs a fixed overhead (Python, kernel launches), a read of every weight "
          "(memory-bound: decode steps at small batch) and 2 FLOPs per weight per token (compute-bound: long "
          "prompts, big batches); every sampled token a softmax and top-k over the vocabulary. A batch of b prompts of L tokens making n new tokens, on a model with N "
          "non-embedding weights, a V x d vocabulary projection and `layers` layers of attention width d_attn, is "
          "n passes (a prefill, n - 1 decode steps; labeling: 1 pass, no new tokens), weight bytes = passes x (N + V "
          "d) x bytes per weight, FLOPs = 2 N b (L + n - 1) + 2 V d b n + 2 layers d_attn b (L^2 + (n - 1)(L + n/2)), "
          "sampled tokens = b n. "
          "Tokens/s = b n / seconds rises with b while the per-pass terms dominate and levels off where the FLOPs "
          "term takes over; longer prompts add prefill FLOPs and L^2 attention.")
    pr = s["prediction"]
    print(f"  predicted by the fit for {pr['model']} at batch {pr['batch']}, {pr['prompt_length']}-token prompts: "
          + (f"generation {pr['generate']:,.1f} tok/s" if pr["generate"] else "generation -") + ", "
          + (f"labeling {pr['label']:,.2f} labels/s" if pr["label"] else "labeling -")
          + " (beyond the measured batches: check one measurement before relying on it)")
    print(f"\nscaling, PPO ({s['ppo'][0]['ppo_steps']} steps per run, s/step after the first; the tiny preset "
          "widened, the ppo_config's ppo settings):")
    print(table([(r["hidden_size"], f"{r['params'] / 1e6:.2f}M", r["rollout_batch"], f"{r['rollout_tokens']:.0f}",
                  f"{r['step_seconds']:.3f}", f"{r['first_step_seconds']:.2f}", ratio(r)) for r in s["ppo"]],
                ("width", "params", "rollout batch", "rollout tokens", "s/step", "first step s", "measured/fit")))
    fit = s["fit"]["ppo"]
    c = fit["coefficients"]
    print(f"cost model of a PPO step (least squares on relative error over the {fit['rows']} runs, coefficients "
          f">= 0):\n  s/step = {c['one']:.3g} s + {c['params'] * 1e6:.3g} s x P + {c['param_tokens'] * 1e9:.3g} s x P "
          f"x T, P = parameters in millions, T = rollout tokens (prompts + answers of a step) in thousands  (rms "
          f"error {fit['rms_rel_error']:.0%}, worst {fit['max_rel_error']:.0%})")
    print("  how to read: the first term is what a step costs whatever the model (Python, logging); the second grows "
          "with the weights alone (the optimizer's pass over every parameter, every weight read once per forward, "
          "and a forward per sampled token); the third is the FLOPs of sampling, scoring and the updates, "
          "proportional to parameters x tokens. These models are 2 layers with a 49,152-token vocabulary (P is "
          "mostly embedding), so use the fit on your model's P and T as a first estimate and time one step of the "
          "real run (sections=ppo).")
    print(f"plot: {s['plot']}")


@cli_main
def main(argv: list[str]) -> int:
    if argv[:1] == ["--ppo-child"]:
        ppo_child(argv[1])
        return 0
    if "--help" in argv or "-h" in argv:

        print(__doc__)
        print("\n".join(help_text(BenchConfig)))
        return 0
    cfg = build_config(BenchConfig, {}, "command line", parse_overrides(argv))
    results = run_bench(cfg)

    write_atomic(cfg.out, json.dumps(results, indent=1))
    print_report(results)
    print(f"\nresults: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
