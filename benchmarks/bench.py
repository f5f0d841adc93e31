"""`python benchmarks/bench.py [sections=gen,label,roofline,accuracy,ppo,demo] [key=value ...]` (`make bench`)

Measures the pipeline's hot paths on one model (default: the bundled SmolLM2-135M), each against a naive
baseline measured in the same run, and prints the ratios beside the targets of issue 6:
- gen: critique generation tokens/s with `TransformersBackend.generate` (the SL stage's path: batched, length
  bucketed, bf16 where the CPU has it) vs HF `model.generate` one prompt at a time, batch 1, float32;
- label: AI labels/s with `cai.feedback.label_pairs` (both letters from one forward, a pair's K principles and
  both orders in one batch, shared-prefix KV cache) vs a naive labeler: one float32 forward of prompt+letter
  per option and per order, batch 1;
- roofline: this machine's matmul FLOP/s (big square matmuls) / the model's FLOPs per token = the prefill
  tokens/s it could reach; the labeling's forward tokens/s as a share of it;
- accuracy: each feedback template's accuracy and position consistency on a labeled set of pairs;
- ppo: a few PPO steps with the demo settings in a subprocess: time per step and peak RSS (the kernel's
  high-water mark of the subprocess's resident set, ru_maxrss), once per variant in `ppo_variants`: full (the demo
  config as it is), separate (full, with a value model of its own), lora (LoRA adapters: the reference is the
  policy with its adapters disabled, the value a head on the policy's backbone);
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

from cai.config import F, build_config, parse_overrides
from cai.errors import CaiError, cli_main
from cai.paths import PROJECT_ROOT
from cai.prompts import load_labeled_set

SECTIONS = ("gen", "label", "roofline", "accuracy", "ppo", "demo")
PPO_VARIANTS = {"full": [], "separate": ["ppo.value_model=separate"],
                "lora": ["ppo.lora.enabled=true", "ppo.value_model=auto"]}
TEMPLATES = "prompts/templates/feedback_mc.txt,prompts/templates/feedback_mc_shared_prefix.txt"


@dataclass
class BenchConfig:
    sections: str = F(",".join(SECTIONS), f"comma-separated sections to run, of {','.join(SECTIONS)} "
                                          "(demo takes ~8 minutes)")
    model: str = F("smollm2-135m", "model of every section (tiny: seconds, for tests)")
    dtype: str = F("auto", "dtype of the fast paths (auto: bf16 where the CPU has it); baselines are float32")
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
    ppo_steps: int = F(4, "PPO steps in the ppo section (the demo runs 4)")
    ppo_variants: str = F("full,separate,lora", "comma-separated PPO variants of the ppo section, each in its own "
                                                "subprocess: " + ", ".join(f"{k} ({' '.join(v) or 'the config as it is'})"
                                                                         for k, v in PPO_VARIANTS.items()))
    demo_runs_dir: str = F("", "runs_dir of the demo section's fresh run (default: a temporary directory, removed)")
    seed: int = F(0, "seed of sampling and principle choice")
    out: str = F("runs/bench.json", "JSON file for the results")
    progress: bool = F(True, "show progress bars")


# --- machine -----------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch
    import transformers

    from cai.models import cpu_supports_bf16

    info = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_supports_bf16(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        info["amx"] = "amx_bf16" in cpuinfo
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gb"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
            f"bf16 {'yes' if m['cpu_bf16'] else 'no'}{' (AMX)' if m.get('amx') else ''}, "
            f"{m.get('memory_gb', '?')} GB RAM, torch {m['torch']}, transformers {m['transformers']}, "
            f"load average at start {m['load_average_at_start'][0]}")


# --- inputs ------------------------------------------------------------------------------------------------


def as_pairs(rows: list[dict]) -> list[dict]:
    """Pairs as cai.feedback takes them; the better answer is answer_a in every other pair (row order)."""
    from cai.records import stable_hash

    pairs = []
    for i, r in enumerate(rows):
        a, b = (r["better"], r["worse"]) if i % 2 == 0 else (r["worse"], r["better"])
        pairs.append({"key": stable_hash(["bench", r["id"], a, b]), "prompt_id": r["id"], "prompt": r["prompt"],
                      "category": r["category"], "answer_a": a, "answer_b": b, "better_is_a": i % 2 == 0})
    return pairs


def label_settings(cfg, template: str, k: int):
    from cai.config import FeedbackConfig
    from cai.feedback import LabelSettings
    from cai.templates import load_template

    f = FeedbackConfig()
    return LabelSettings(seed=cfg.seed, principles_per_pair=k, conversation_template=load_template(f.conversation_template),
                         template=load_template(template))


def constitutions(cfg) -> dict:
    from cai.constitution import load_constitution

    return {"harmless": load_constitution(cfg.harmless_constitution),
            "helpful": load_constitution(cfg.helpful_constitution)}


def ai_label(pairs: list[dict], cfg, settings, backend) -> tuple[list[dict], dict[str, float]]:
    """cai.feedback.label_pairs on a fresh store, each category with its own constitution.

    Returns the comparisons and every scored prompt's P(option A), by request key."""
    from cai.feedback import label_pairs, label_requests
    from cai.store import JsonlStore

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
    from cai.backends import Sampling
    from cai.config import CritiqueConfig
    from cai.critique import ChainSettings, choose_principle, critique_request
    from cai.prompts import PromptRecord, load_few_shot
    from cai.templates import load_template

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

    from cai.backends import Sampling

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
        ids = torch.tensor([tok(fast.chat_prompt(conv), add_special_tokens=False)["input_ids"]])
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
    return {"requests": len(convs), "new_tokens": cfg.gen_tokens, "prompt_tokens_mean": sum(prompt_tokens) / len(outs),
            "fast": f"TransformersBackend.generate, batch {fast.batch_size}, {_dtype(fast.model)}",
            "baseline": "HF model.generate, one prompt at a time, batch 1, float32",
            "fast_tokens": fast_tokens, "fast_seconds": fast_s, "fast_tok_s": fast_rate,
            "naive_tokens": naive_tokens, "naive_seconds": naive_s, "naive_tok_s": naive_rate,
            "ratio": fast_rate / naive_rate}


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
    ids = torch.tensor([full])
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=len(full) - n + 1).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[j, full[n + j]] for j in range(len(full) - n)))


def bench_label(cfg, fast, naive_model) -> dict:
    from tqdm import tqdm

    from cai.feedback import OPTIONS, label_requests
    from cai.losses import preference_probs_from_option_logprobs

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


def matmul_flops(dtype, n: int, seconds: float = 0.5) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul: best of repeated timings for about `seconds`."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(model, context: float) -> tuple[float, str]:
    """Forward FLOPs per token: 2 * non-embedding params + 2 * n_layers * context * d_attn (Kaplan et al. 2020,
    https://arxiv.org/abs/2001.08361 table 1); the vocabulary projection runs for the scored position only."""
    c = model.config
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    n = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    d_attn = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    value = 2 * n + 2 * c.num_hidden_layers * context * d_attn
    return value, (f"2 x {n:,} non-embedding params + 2 x {c.num_hidden_layers} layers x {context:.0f} context x "
                   f"{d_attn} d_attn (Kaplan et al. 2020)")


def bench_roofline(cfg, fast, label: dict | None) -> dict:
    import torch

    context = label["mean_prompt_tokens"] if label else 256.0
    per_token, formula = flops_per_token(fast.model, context)
    flops = {name: matmul_flops(dt, cfg.matmul_size) for name, dt in (("bfloat16", torch.bfloat16),
                                                                       ("float32", torch.float32))}
    roof = {name: f / per_token for name, f in flops.items()}
    out = {"matmul_size": cfg.matmul_size, "matmul_gflop_s": {k: v / 1e9 for k, v in flops.items()},
           "flops_per_token": per_token, "formula": formula, "context": context, "roofline_tok_s": roof}
    if label:
        dt = _dtype(fast.model)
        out.update({"label_dtype": dt, "label_forward_tok_s": label["forward_tok_s"],
                    "label_share": label["forward_tok_s"] / roof[dt]})
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
    with tempfile.TemporaryDirectory(prefix="cai-bench-ppo-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": cfg.model, "config": cfg.ppo_config, "steps": cfg.ppo_steps,
                                    "seed": cfg.seed, "dir": tmp, "overrides": list(overrides)}))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ppo-child", str(spec)], capture_output=True,
                              text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"ppo section: the PPO subprocess failed:\n{proc.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
    steps = result["step_seconds"]
    return {**result, "subprocess_seconds": wall, "first_step_seconds": steps[0],
            "step_seconds_mean": sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0]}


def ppo_child(spec_path: str) -> None:
    """PPO as the RL stage runs it: a PM from the model (fresh scalar head) scores answers, the value model starts
    from the PM (the demo's value_init), the reference is the starting policy."""
    import torch

    from cai.config import load_config
    from cai.io import read_jsonl
    from cai.models import load_tokenizer, resolve_model
    from cai.prompts import load_prompts
    from cai.store import Metrics
    from cai.train.pm import init_pm, load_pm, score_answers
    from cai.train.ppo import run_ppo

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["dir"])
    cfg = load_config([f"config={spec['config']}", f"ppo.steps={spec['steps']}", f"ppo.save_every={spec['steps']}",
                       "ppo.sample_every=0", *spec.get("overrides", [])])
    ref = resolve_model(spec["model"])
    tok = load_tokenizer(ref)
    pm = init_pm(ref, tok, spec["seed"])
    pm.save_pretrained(work / "pm", safe_serialization=True)
    tok.save_pretrained(work / "pm")
    del pm
    pm, pm_tok = load_pm(work / "pm")
    prompts = [p.prompt for p in load_prompts(cfg.red_team) + load_prompts(cfg.helpful)]
    summary = run_ppo(ref, lambda ps, answers: score_answers(pm, pm_tok, ps, answers, batch_size=cfg.pm.batch_size * 2),
                      prompts, cfg.ppo, work / "ppo", Metrics(work / "metrics.jsonl", "rl"),
                      value_init=resolve_model(str(work / "pm")) if cfg.ppo.value_init == "pm" else None,
                      reference=ref, progress=False)
    cumulative = [r["rl/ppo/seconds"] for r in read_jsonl(work / "metrics.jsonl") if "rl/ppo/seconds" in r]
    step_seconds = [b - a for a, b in zip([0.0] + cumulative, cumulative)]
    result = {"steps": len(step_seconds), "step_seconds": step_seconds, "bf16": summary.get("bf16"),
              "overrides": spec.get("overrides", []), "lora": summary.get("lora"),
              "value_model": summary.get("value_model"), "shared_reference": summary.get("shared_reference"),
              "rollout_batch_size": cfg.ppo.rollout_batch_size, "max_new_tokens": cfg.ppo.max_new_tokens,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
              "torch_threads": torch.get_num_threads()}
    (work / "result.json").write_text(json.dumps(result))


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
             ("rl", ["-m", "cai.pipeline", "config=pipelines/demo_rl.yaml", *where])]
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
        if name == "lora":
            add("PPO peak RSS, LoRA (GB)", p["peak_rss_gb"], "<=", 3)
        else:
            add(f"PPO peak RSS, {name} (GB)", p["peak_rss_gb"], "<=", 6)
    if "demo" in r:
        add("make demo (minutes)", r["demo"]["total_minutes"], "<=", 10)
    return rows


def run_bench(cfg) -> dict:
    from cai.backends.transformers_backend import TransformersBackend, configure_cpu_threads
    from cai.models import load_causal_lm, resolve_model

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
    if any(s in sections for s in ("gen", "label", "accuracy")):  # inputs are checked before any model loads
        load_labeled_set(cfg.labeled_set)
        constitutions(cfg)
        for t in [cfg.template, *cfg.accuracy_templates.split(",")]:
            label_settings(cfg, t.strip(), cfg.principles)
    configure_cpu_threads()  # the same threads for the fast paths and the baselines
    results: dict = {"machine": machine(), "model": cfg.model, "sections": sections}
    print(f"machine: {describe(results['machine'])}")
    needs_models = any(s in sections for s in ("gen", "label", "roofline", "accuracy"))
    fast = naive = None
    if needs_models:
        ref = resolve_model(cfg.model)
        fast = TransformersBackend(ref, dtype=cfg.dtype, batch_size=cfg.batch_size, progress=False)
        if "gen" in sections or "label" in sections:
            naive = load_causal_lm(ref, "float32", "cpu")
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
        elif section == "demo":
            results["demo"] = bench_demo(cfg)
        print(f"[{section}] done in {time.perf_counter() - t:.1f} s", flush=True)
    results["targets"] = targets(results)
    return results


def print_report(r: dict) -> None:
    from cai.io import table

    f = lambda v, d=1: f"{v:,.{d}f}"  # noqa: E731
    print(f"\nmodel {r['model']} on {describe(r['machine'])}")
    if "gen" in r:
        g = r["gen"]
        print(f"generation: {g['requests']} critique requests x {g['new_tokens']} new tokens (mean prompt "
              f"{g['prompt_tokens_mean']:.0f} tokens): {f(g['fast_tok_s'])} tok/s ({g['fast']}) vs "
              f"{f(g['naive_tok_s'])} tok/s ({g['baseline']}) = {g['ratio']:.2f}x")
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
                 f"{rf['label_dtype']} roofline" if "label_share" in rf else ""))
    if "accuracy" in r:
        a = r["accuracy"]
        print(f"accuracy on {a['pairs']} labeled pairs, {a['principles']} principles each (chance 0.5):")
        print(table([(t, f"{s['accuracy']:.3f}", f"{s['position_consistency']:.3f}", f"{s['mean_p_better']:.3f}",
                      *(f"{s['by_category'].get(c, {}).get('accuracy', float('nan')):.3f}" for c in ("harmless", "helpful")))
                     for t, s in a["templates"].items()],
                    ("template", "accuracy", "position consistency", "mean P(better)", "harmless", "helpful")))
    for name, p in r.get("ppo", {}).items():
        print(f"PPO {name} ({p['value_model']} value, {'LoRA' if p['lora'] else 'full'}, reference "
              f"{'= policy with adapters off' if p['shared_reference'] else 'a second copy'}): {p['steps']} steps of "
              f"{p['rollout_batch_size']} rollouts x <= {p['max_new_tokens']} tokens: {p['step_seconds_mean']:.1f} "
              f"s/step after the first ({p['first_step_seconds']:.1f} s incl. loading), peak RSS "
              f"{p['peak_rss_gb']:.2f} GB")
    if "demo" in r:
        d = r["demo"]
        print("make demo: " + ", ".join(f"{k} {v:.0f} s" for k, v in d["seconds"].items())
              + f"; total {d['total_minutes']:.1f} min")
    if r["targets"]:
        print("\n" + table([(t["name"], f"{t['value']:.2f}", t["target"], "met" if t["met"] else "NOT met")
                            for t in r["targets"]], ("measure", "value", "target", "")))


@cli_main
def main(argv: list[str]) -> int:
    if argv[:1] == ["--ppo-child"]:
        ppo_child(argv[1])
        return 0
    if "--help" in argv or "-h" in argv:
        from cai.config import help_text

        print(__doc__)
        print("\n".join(help_text(BenchConfig)))
        return 0
    cfg = build_config(BenchConfig, {}, "command line", parse_overrides(argv))
    results = run_bench(cfg)
    from cai.io import write_atomic

    write_atomic(cfg.out, json.dumps(results, indent=1))
    print_report(results)
    print(f"\nresults: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
