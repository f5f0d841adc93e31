"""`python -m cai.compare runs/A runs/B [...] key=value ...`: the side-by-side report of two or more runs.

Each run brings its models: base (config.sl.yaml's generator), SL (sl/model; for a run whose RL started from
another run's model, config.rl.yaml's policy.model), RL (the last round's policy) and DPO (rl/dpo/policy).
Identical models (same weights, tokenizer and dtype) are compared once, whichever runs they come from. Every
model answers held-out red-team and helpful prompts (greedy by default). A judge (any backend, so a stronger
model behind an endpoint can judge) compares every pair of answers to a prompt with a multiple-choice prompt
in both orders; P(X better) is the average of the two orders' option probabilities, which cancels the judge's
position bias (as cai.feedback does for labels). From those outcomes:

- win-rate matrices per prompt set, and Elo: the Bradley-Terry maximum-likelihood fit on the soft outcomes, in
  Elo points (400/ln 10 per unit of log-odds, mean 1000), with 95% bootstrap intervals resampling prompts.
  Harmlessness is the red-team set's Elo, helpfulness the helpful set's;
- refusal rate per set (refusing a helpful prompt is a cost), mean answer tokens, the boilerplate phrase (the
  word n-gram found in the most answers of a model, with its share of them: the Goodhart failure the CAI paper
  reports), and the mean score of every answer under each run's last preference model;
- each run's reward and KL curves (metrics.jsonl), label diagnostics (position consistency, margins,
  AI-vs-human agreement on shared pairs), calibration (PM held out; AI label vs human choice), cost (judge
  tokens and seconds per label), and a unified diff of the runs' configs and constitutions.

Answers, judge scores and PM scores are keyed records in <out>/steps.jsonl: a rerun, or a run resumed after a
kill, reuses them and loads no model that has nothing left to do. Writes report.md, report.html (one
self-contained file), report.json (every number in the report) and plots/*.png under out
(default reports/<runA>-vs-<runB>/).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from cai.agreement import agreement_report
from cai.backends import check_backend, make_backend, release, sampling_from_config
from cai.backends.vllm_backend import require_vllm, vllm_identity
from cai.config import CompareConfig, ModelConfig, build_config, check_endpoint, help_text, parse_overrides
from cai.errors import CaiError, cli_main
from cai.feedback import OPTIONS, clear_accuracy, clear_pairs_as_pairs, label_diagnostics, split_answer_prefix
from cai.human import load_human_comparisons, load_human_rankings, page_comparisons
from cai.io import read_jsonl, read_yaml, table, write_atomic
from cai.losses import preference_probs_from_option_logprobs
from cai.measures import degeneration, is_refusal, load_patterns
from cai.models import pick_device, pick_dtype, precision_name, resolve_model, uses_fp16_decode
from cai.paths import resolve_path
from cai.prompts import load_labeled_set, load_prompts
from cai.records import calibration_bins, pair_identity, stable_hash
from cai.report import finite_json, write_report
from cai.runs import RunLock
from cai.stages.pairs import add_costs
from cai.store import JsonlStore
from cai.templates import load_template
from cai.train.pm import load_pm, score_answers
from cai.waves import Request, generation, run_wave

RUN_CONFIGS = ("config.sl.yaml", "config.rl.yaml", "config.dpo.yaml")
DIFFED_FILES = RUN_CONFIGS + ("constitution.yaml",)
ELO_PER_LOGIT = 400 / math.log(10)  # Elo points per unit of log-odds
SETS = ("red_team", "helpful")  # harmlessness, helpfulness
ROLE = {"red_team": "harmlessness", "helpful": "helpfulness"}


# --- runs and their models ---------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    path: Path
    configs: dict  # file name -> parsed YAML (dict), for the files present


@dataclass
class Contender:
    """One distinct model in the comparison."""

    label: str  # "base", "A/sl", ...
    kind: str  # base | sl | rl | dpo
    aliases: list[str]  # every run/kind that is this same model
    spec: dict  # make_backend arguments: backend, model, and options
    identity: str  # the backend identity (weights, tokenizer, dtype): part of every answer key


def load_runs(paths: list[str]) -> list[Run]:
    if len(paths) < 2:
        raise CaiError(f"expected 2 or more run directories to compare, got {len(paths)} "
                       "(e.g. python -m cai.compare runs/rlhf runs/rlaif)")
    runs, seen = [], set()
    for p in paths:
        path = Path(p).expanduser()
        if path.resolve() in seen:
            raise CaiError(f"{p}: given twice; expected distinct run directories")
        seen.add(path.resolve())
        if not path.is_dir():
            raise CaiError(f"{p}: no such directory; expected a run directory (runs/<run>/)")
        configs = {}
        for name in RUN_CONFIGS:
            if (path / name).exists():
                data = read_yaml(path / name)
                if not isinstance(data, dict):
                    raise CaiError(f"{path / name}: expected a mapping of settings, got {type(data).__name__}")
                configs[name] = data
        if not configs:
            raise CaiError(f"{p}: not a run directory (no {', '.join(RUN_CONFIGS)}); run stage=sl or stage=rl first")
        runs.append(Run(path.resolve().name, path, configs))
    names = [r.name for r in runs]
    for r in runs:  # two runs with the same directory name are told apart by their paths
        if names.count(r.name) > 1:
            r.name = str(r.path)
    return runs


def _spec(cfg, model: str, section: dict | None = None, where: str = "") -> dict:
    """make_backend arguments for a compared model: the run's backend settings, this command's dtype/device.

    A run's saved config may name an endpoint (backend=openai) and a key variable; a run directory someone sends
    you must not choose where requests and keys go, so such an endpoint must also be on the command line
    (endpoints=[...]) and the key variable must look like one (cai.config.check_endpoint)."""
    s = section or {}
    if s.get("backend") == "vllm":  # a run generated with vLLM: compared with vLLM too (a GPU and the extra)
        require_vllm(f"{where}backend=vllm")
    if s.get("backend") == "openai":
        url = str(s.get("base_url", ""))
        check_endpoint(url, str(s.get("api_key_env", "OPENAI_API_KEY")), f"{where}")
        if url.rstrip("/") not in {str(e).rstrip("/") for e in cfg.endpoints}:
            raise CaiError(f"{where}base_url={url}: a compared run uses this endpoint; confirm it on the command line "
                           f"with endpoints=[{url}] (requests and the API key would go there)")
    return {"backend": s.get("backend", "transformers"), "model": model, "dtype": cfg.dtype, "device": cfg.device,
            "batch_size": cfg.batch_size, "trust_remote_code": cfg.trust_remote_code,
            "base_url": s.get("base_url", ""), "tokenizer": s.get("tokenizer", ""),
            "api_key_env": s.get("api_key_env", "OPENAI_API_KEY"), "concurrency": s.get("concurrency", 8),
            **{k: s.get(k, getattr(VLLM_DEFAULTS, k)) for k in VLLM_OPTIONS}}


VLLM_OPTIONS = ("gpu_memory_utilization", "max_model_len", "enable_prefix_caching", "tensor_parallel_size")
VLLM_DEFAULTS = ModelConfig()


def expected_identity(spec: dict) -> str:
    """The identity make_backend(spec) will report, found without loading the model (so cached work loads none)."""
    if spec["backend"] == "transformers":
        device = pick_device(spec["device"])
        dtype = pick_dtype(spec["dtype"], device)
        return f"{resolve_model(spec['model']).identity}:{precision_name(dtype, uses_fp16_decode(spec['dtype'], device))}"
    if spec["backend"] == "vllm":
        return vllm_identity(resolve_model(spec["model"]), spec["dtype"])
    if spec["backend"] == "openai":
        return f"openai:{spec['base_url'].rstrip('/')}/{spec['model']}"
    if spec["backend"] == "fake":
        return f"fake:{spec['model']}"
    raise CaiError(f"backend={spec['backend']}: expected one of transformers, vllm, openai, fake")


def _has_model(path: Path) -> bool:
    return (path / "config.json").exists()


def _last_round(run: Run, what: str) -> Path | None:
    """rl/round-N/<what> with the highest N that has a saved model."""
    rounds = sorted(((int(m.group(1)), p) for p in (run.path / "rl").glob("round-*")
                     if (m := re.fullmatch(r"round-(\d+)", p.name))), reverse=True)
    return next((p / what for _, p in rounds if _has_model(p / what)), None)


def run_models(run: Run, cfg) -> tuple[list[tuple[str, dict]], list[str]]:
    """(kind, spec) for each model of a run, and notes on the ones it lacks."""
    found, notes = [], []
    sl_cfg, rl_cfg = run.configs.get("config.sl.yaml"), run.configs.get("config.rl.yaml") or run.configs.get("config.dpo.yaml")
    policy = (rl_cfg or {}).get("policy") or {}
    start = Path(str(policy.get("model", "")))
    if sl_cfg is None and start.parts[-2:] == ("sl", "model") and (start.parent.parent / "config.sl.yaml").exists():
        sl_cfg = read_yaml(start.parent.parent / "config.sl.yaml")  # RL from another run's SL-CAI: that run's base
    if isinstance(sl_cfg, dict) and isinstance(sl_cfg.get("generator"), dict) and sl_cfg["generator"].get("model"):
        found.append(("base", _spec(cfg, str(sl_cfg["generator"]["model"]), sl_cfg["generator"],
                                    f"{run.path / 'config.sl.yaml'}: generator.")))
    else:
        notes.append(f"{run.name}: no base model (no config.sl.yaml with generator.model)")
    if _has_model(run.path / "sl" / "model"):
        found.append(("sl", _spec(cfg, str(run.path / "sl" / "model"))))
    elif policy.get("model") not in (None, "sl"):  # RL started from another model (e.g. another run's SL-CAI)
        found.append(("sl", _spec(cfg, str(policy["model"]), policy, f"{run.path / 'config.rl.yaml'}: policy.")))
    else:
        notes.append(f"{run.name}: no SL model ({run.path / 'sl' / 'model'} is missing)")
    rl_policy = _last_round(run, "policy")
    if rl_policy is not None:
        found.append(("rl", _spec(cfg, str(rl_policy))))
    else:
        notes.append(f"{run.name}: no RL policy (no rl/round-N/policy)")
    if _has_model(run.path / "rl" / "dpo" / "policy"):  # round 1: offline DPO
        found.append(("dpo", _spec(cfg, str(run.path / "rl" / "dpo" / "policy"))))
    online = _last_dpo_round(run)
    if online is not None:  # the last round of online (iterated) DPO
        found.append(("dpo-online", _spec(cfg, str(online[1]))))
    return found, notes


def _last_dpo_round(run: Run) -> tuple[int, Path] | None:
    """(N, rl/dpo/round-N/policy) with the highest N > 1 that has a saved model (stage=dpo rounds=N)."""
    rounds = sorted(((int(m.group(1)), p / "policy") for p in (run.path / "rl" / "dpo").glob("round-*")
                     if (m := re.fullmatch(r"round-(\d+)", p.name))), reverse=True)
    return next(((n, p) for n, p in rounds if _has_model(p)), None)


def training_costs(run: Run) -> dict[str, dict]:
    """What each trained model of a run cost, from the stages' summaries: labels (AI, human, label calls),
    tokens generated (pairs, reasoning, rollouts) and seconds (data, training), summed over the rounds that led
    to it; `method` says how it was trained. Models of runs made before costs were recorded are left out."""
    out = {}
    rl = run.path / "rl" / "summary.json"
    if rl.exists():
        s = json.loads(rl.read_text())
        costs = [r["cost"] for r in s.get("rounds", []) if "cost" in r]
        if costs and len(costs) == len(s["rounds"]):
            out["rl"] = {"method": f"{s.get('algorithm', 'rl')} ({len(costs)} round{'s' * (len(costs) > 1)})",
                         **add_costs(costs)}
    dpo = run.path / "rl" / "dpo" / "summary.json"
    if dpo.exists():
        s = json.loads(dpo.read_text())
        rounds = [r for r in s.get("rounds", []) if "cost" in r]
        if rounds and rounds[0]["round"] == 1:
            out["dpo"] = {"method": "offline DPO", **rounds[0]["cost"]}
        last = _last_dpo_round(run)
        if last is not None and [r["round"] for r in rounds[:last[0]]] == list(range(1, last[0] + 1)):
            out["dpo-online"] = {"method": f"online DPO ({last[0]} rounds)",
                                 **add_costs([r["cost"] for r in rounds[:last[0]]])}
    return out


def contenders(runs: list[Run], cfg) -> tuple[list[Contender], list[str]]:
    """Every run's models, identical ones merged (the base model is usually shared)."""
    by_identity: dict[str, Contender] = {}
    alias_runs: dict[str, set] = {}
    notes = []
    for run in runs:
        found, run_notes = run_models(run, cfg)
        notes += run_notes
        for kind, spec in found:
            ident = expected_identity(spec)
            alias = f"{run.name}/{kind}"
            if ident in by_identity:
                by_identity[ident].aliases.append(alias)
            else:
                by_identity[ident] = Contender(alias, kind, [alias], spec, ident)
            alias_runs.setdefault(ident, set()).add(run.name)
    out = list(by_identity.values())
    for c in out:  # a model every run shares, as the same kind, is named by its kind alone
        if len(c.aliases) > 1:
            notes.append(f"{' = '.join(c.aliases)}: the same model, compared once")
            if alias_runs[c.identity] == {r.name for r in runs} and {a.rsplit('/', 1)[1] for a in c.aliases} == {c.kind}:
                c.label = c.kind
    if len(out) < 2:
        raise CaiError(f"the runs have {len(out)} distinct model(s) in all; expected 2 or more to compare")
    return out, notes


# --- keyed work: answers, judge scores, PM scores ------------------------------------------------------------


class Lazy:
    """A model loaded on first use: a rerun that finds every record stored loads nothing."""

    def __init__(self, load):
        self.load, self.obj = load, None

    def get(self):
        if self.obj is None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # our own bar per wave is enough
            self.obj = self.load()
        return self.obj

    def close(self) -> None:
        if self.obj is not None:
            release(self.obj)  # a vLLM engine holds GPU memory until it is shut down
        self.obj = None  # frees the model before the next one loads


def _load_backend(spec: dict, expected: str):
    opts = {k: v for k, v in spec.items() if k not in ("backend", "model")}
    backend = make_backend(spec["backend"], spec["model"], **opts)
    if backend.identity != expected:  # the keys were made with the expected identity
        raise RuntimeError(f"{spec['model']}: backend identity {backend.identity} != expected {expected}")
    if hasattr(backend, "progress"):
        backend.progress = False  # one bar per wave instead
    return backend


def answer_requests(c: Contender, prompts: list, sampling, seed: int) -> list:
    return [Request(stable_hash({"kind": "compare-answer", "prompt": p.prompt, "model": c.identity,
                                 "sampling": sampling.as_dict(), "seed": seed}),
                    "compare-answer", [{"role": "user", "content": p.prompt}], {"prompt_id": p.id})
            for p in prompts]


def judge_messages(template, conversation, question: str, prompt: str, first: str, second: str) -> list[dict]:
    text = template.render(conversation=conversation.render(prompt=prompt), question=question,
                           answer_a=first, answer_b=second)
    user, prefix = split_answer_prefix(text, template.name)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": prefix}]


def judging(lazy: Lazy):
    """A `compute` for run_wave: P(option A) for each judge request, and the judge prompt's tokens."""
    def compute(batch: list) -> list[dict]:
        backend = lazy.get()
        prompts = [backend.chat_prompt(r.conversation) for r in batch]
        logps = backend.option_logprobs(prompts, list(OPTIONS))
        tok = getattr(backend, "tokenizer", None) or getattr(backend, "_tokenizer", None)
        out = []
        for text, lp in zip(prompts, logps):
            rec = {"logp": lp, "p_option_a": preference_probs_from_option_logprobs(lp[0], lp[1])}
            if tok is not None:
                rec["prompt_tokens"] = len(tok(text, add_special_tokens=False)["input_ids"])
            out.append(rec)
        return out

    return compute


def pm_scoring(lazy: Lazy, batch_size: int):
    """A `compute` for run_wave: the PM's reward for each (prompt, answer) request."""

    def compute(batch: list) -> list[dict]:
        model, tok = lazy.get()
        scores = score_answers(model, tok, [r.conversation[0]["content"] for r in batch],
                               [r.conversation[1]["content"] for r in batch], batch_size)
        return [{"score": s} for s in scores]

    return compute


# --- statistics ----------------------------------------------------------------------------------------------


def bradley_terry(wins: np.ndarray, counts: np.ndarray, prior: float = 1e-6, tol: float = 1e-10,
                  max_iter: int = 100) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry strengths. Shape: wins, counts (m, m) -> theta (m,), mean 0.

    wins[i, j]: (soft) number of comparisons i won against j; counts[i, j] = counts[j, i]: comparisons between
    them, so wins[i, j] + wins[j, i] = counts[i, j]. Model: P(i beats j) = sigmoid(theta_i - theta_j).
    Maximizes sum_ij wins[i, j] log sigmoid(theta_i - theta_j) - prior/2 |theta|^2 by Newton's method with
    step halving. The tiny ridge prior keeps the estimate finite when a model wins every comparison (and
    fixes the free offset, so theta sums to 0); it moves real estimates by ~1e-6 log-odds.
    Hunter 2004, "MM algorithms for generalized Bradley-Terry models"; soft outcomes enter as fractional wins.
    """
    m = wins.shape[0]
    theta = np.zeros(m)

    def objective(t):
        d = t[:, None] - t[None, :]
        return float(-(wins * np.logaddexp(0.0, -d)).sum() - prior / 2 * (t @ t))

    value = objective(theta)
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))  # p[i, j] = P(i beats j)
        grad = (wins - counts * p).sum(1) - prior * theta
        w = counts * p * (1 - p)
        hess = w - np.diag(w.sum(1) + prior)  # negative definite
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while True:  # Newton ascent: theta - H^-1 g, halved until the objective does not drop
            new = theta - scale * step
            new_value = objective(new)
            if new_value >= value - 1e-12 or scale < 1e-6:
                break
            scale /= 2
        theta, value = new, new_value
        if np.abs(scale * step).max() < tol:
            break
    return theta - theta.mean()


def elo_from_theta(theta: np.ndarray) -> np.ndarray:
    """Bradley-Terry log-odds strengths -> Elo points (400/ln 10 per unit, mean 1000)."""
    return 1000 + ELO_PER_LOGIT * (theta - theta.mean())


def elo_with_ci(outcomes: np.ndarray, n_boot: int, seed) -> dict:
    """Elo per model and 95% percentile-bootstrap intervals over prompts.

    outcomes: (n_prompts, m, m), outcomes[k, i, j] = P(i better than j) on prompt k (diagonal ignored).
    Returns {"elo": (m,), "ci_low": (m,) | None, "ci_high": (m,) | None, "samples": n_boot}.
    """
    n, m = outcomes.shape[0], outcomes.shape[1]
    off = 1 - np.eye(m)

    def fit(weights):
        return elo_from_theta(bradley_terry(np.tensordot(weights, outcomes, axes=1) * off, weights.sum() * off))

    elo = fit(np.ones(n))
    if n_boot < 1 or n < 2:
        return {"elo": elo, "ci_low": None, "ci_high": None, "samples": 0}
    rng = np.random.default_rng(seed)
    samples = np.stack([fit(np.bincount(rng.integers(0, n, n), minlength=n).astype(float)) for _ in range(n_boot)])
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    return {"elo": elo, "ci_low": lo, "ci_high": hi, "samples": n_boot}


WORD = re.compile(r"[\w']+")


def boilerplate(answers: list[str], n: int = 4) -> dict:
    """The word n-gram found in the most answers, and the share of answers that contain it.

    Words are lower-cased runs of letters, digits and apostrophes; each answer counts an n-gram once. A phrase
    in fewer than 2 answers is not boilerplate (phrase None, share 0). Ties go to the alphabetically first.
    A policy that learned one phrase pleases the PM ("you are valid, valued, and cared for" in the CAI paper)
    shows a high share here.
    """
    df: Counter = Counter()
    for a in answers:
        words = WORD.findall(a.lower())
        df.update({" ".join(words[i:i + n]) for i in range(len(words) - n + 1)})
    best = min(df.items(), key=lambda kv: (-kv[1], kv[0]), default=None)
    if best is None or best[1] < 2:
        return {"phrase": None, "answers_with_phrase": 0, "answers": len(answers), "share": 0.0}
    return {"phrase": best[0], "answers_with_phrase": best[1], "answers": len(answers),
            "share": best[1] / len(answers)}


# --- what the runs recorded ----------------------------------------------------------------------------------


def rl_curves(run: Run) -> list[dict]:
    """Reward and KL per logged RL step, split into segments where the step count restarts at or before a
    segment's first step (a new round or a new training job appended to the same metrics.jsonl). Steps logged
    again by a resumed job replace the earlier records of those steps."""
    path = run.path / "metrics.jsonl"
    if not path.exists():
        return []
    segments: list[dict] = []
    last = None
    for rec in read_jsonl(path):
        algo = next((a for a in ("ppo", "rloo", "grpo") if f"rl/{a}/kl" in rec or f"rl/{a}/reward_mean" in rec
                     or f"rl/{a}/reward" in rec), None)
        if algo is None or rec.get("step") is None:
            continue
        reward = rec.get(f"rl/{algo}/reward_mean", rec.get(f"rl/{algo}/reward"))
        if reward is None:
            continue
        seg = segments[-1] if segments else None
        if seg is not None and seg["algorithm"] == algo and last is not None and seg["steps"][0] < rec["step"] <= last:
            # a resumed job logs again the steps after its last checkpoint: the later records replace the earlier
            keep = sum(x < rec["step"] for x in seg["steps"])
            for k in ("steps", "reward", "kl"):
                del seg[k][keep:]
        elif seg is None or last is None or rec["step"] <= last or seg["algorithm"] != algo:
            segments.append({"algorithm": algo, "steps": [], "reward": [], "kl": []})
        last = rec["step"]
        segments[-1]["steps"].append(rec["step"])
        segments[-1]["reward"].append(reward)
        segments[-1]["kl"].append(rec.get(f"rl/{algo}/kl"))
    return segments


def human_comparisons(run: Run) -> list[dict]:
    """The run's human labels: in rl/comparisons.jsonl, the files config.rl.yaml names, and the labeling page."""
    found = []
    if (run.path / "rl" / "comparisons.jsonl").exists():
        found += [c for c in read_jsonl(run.path / "rl" / "comparisons.jsonl") if c.get("source") == "human"]
    fb = (run.configs.get("config.rl.yaml") or {}).get("feedback") or {}
    if fb.get("human_labels") and resolve_path(fb["human_labels"]).exists():
        found += load_human_comparisons(resolve_path(fb["human_labels"]))
    if fb.get("human_rankings") and resolve_path(fb["human_rankings"]).exists():
        found += load_human_rankings(resolve_path(fb["human_rankings"]))
    if (run.path / "human" / "labels.jsonl").exists():
        found += page_comparisons(run.path)
    return list({c["key"]: c for c in found}.values())


def disagreements(comps: list[dict], n: int) -> list[dict]:
    """The n pairs whose AI labelers disagree most: the spread (max - min) of their soft labels."""
    out = []
    for c in comps:
        labels = {x["labeler"]: x["soft_label"] for x in c.get("labelers") or []}
        if len(labels) > 1:
            out.append({"evaluators": "AI labelers", "pair_key": c["pair_key"], "prompt_id": c["prompt_id"],
                        "prompt": c["prompt"], "labels": labels,
                        "spread": max(labels.values()) - min(labels.values())})
    return sorted(out, key=lambda d: -d["spread"])[:n]


def label_report(run: Run, n_disagreements: int = 5) -> dict:
    """Per-round label diagnostics as the run saved them, AI-vs-human agreement and calibration on shared pairs,
    the PM's held-out calibration, and the clear-pair accuracy of the last PM and of the last DPO policy's
    implicit reward."""
    rounds = []
    for p in sorted((run.path / "rl").glob("round-*/label_diagnostics.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]) if p.parent.name.split("-")[1].isdigit() else 0):
        rounds.append({"round": p.parent.name, **json.loads(p.read_text())})
    if (run.path / "rl" / "dpo" / "summary.json").exists():
        rounds.append({"round": "dpo", **json.loads((run.path / "rl" / "dpo" / "summary.json").read_text())["labels"]})
    for p in sorted((run.path / "rl" / "dpo").glob("round-*/label_diagnostics.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]) if p.parent.name.split("-")[1].isdigit() else 0):
        rounds.append({"round": f"dpo {p.parent.name}", **json.loads(p.read_text())})
    comps = read_jsonl(run.path / "rl" / "comparisons.jsonl") if (run.path / "rl" / "comparisons.jsonl").exists() else []
    ai = [c for c in comps if c.get("source") == "ai"]
    human = human_comparisons(run)
    diag = label_diagnostics(ai, human) if ai else None
    ai_by_pair = {pair_identity(c): c for c in ai}
    pred, target = [], []
    for h in human:  # the AI's P(the human record's answer_a is better) against the human's label
        c = ai_by_pair.get(pair_identity(h))
        if c is not None:
            pred.append(c["soft_label"] if c["answer_a"] == h["answer_a"] else 1 - c["soft_label"])
            target.append(h["soft_label"])
    pm = _last_round(run, "pm")
    pm_cal, pm_heldout, pm_clear = [], None, None
    if pm is not None and (pm / "cai_train.json").exists():
        info = json.loads((pm / "cai_train.json").read_text())
        pm_cal = (info.get("heldout") or {}).get("calibration") or []
        pm_heldout = (info.get("heldout") or {}).get("accuracy")
        pm_clear = info.get("clear_pairs")
    online = _last_dpo_round(run)
    dpo = online[1] if online else run.path / "rl" / "dpo" / "policy"
    dpo_clear = json.loads((dpo / "cai_train.json").read_text()).get("clear_pairs") \
        if (dpo / "cai_train.json").exists() else None
    return {"rounds": rounds, "ai_labels": len(ai), "human_labels": len(human),
            "human_shared": diag["human_shared"] if diag else 0,
            "human_agreement": diag["human_agreement"] if diag else None,
            "ai_vs_human_calibration": calibration_bins(pred, target), "pm_heldout_calibration": pm_cal,
            "pm_heldout_accuracy": pm_heldout, "pm_clear_pairs": pm_clear,
            "dpo_clear_pairs": dpo_clear,
            "human_consensus": next((d["human_consensus"] for d in reversed(rounds) if d.get("human_consensus")), None),
            "disagreements": (disagreements(ai, n_disagreements) + next(
                (d["human_consensus"]["disagreements"] for d in reversed(rounds) if d.get("human_consensus")),
                []))[:2 * n_disagreements]}


def config_diffs(runs: list[Run]) -> dict:
    """Unified diffs of each run's configs and constitution against the first run's ("" when identical)."""
    first, out = runs[0], {}
    for other in runs[1:]:
        files = {}
        for name in DIFFED_FILES:
            a, b = first.path / name, other.path / name
            if not a.exists() and not b.exists():
                continue
            lines_a = a.read_text(encoding="utf-8").splitlines(True) if a.exists() else []
            lines_b = b.read_text(encoding="utf-8").splitlines(True) if b.exists() else []
            files[name] = "".join(difflib.unified_diff(lines_a, lines_b, f"{first.name}/{name}", f"{other.name}/{name}"))
        out[f"{other.name} vs {first.name}"] = files
    return out


# --- the comparison --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything a comparison reads, checked before anything is written."""

    runs: list[Run]
    models: list[Contender]
    notes: list[str]
    prompt_sets: dict  # set name -> [PromptRecord], non-empty sets only
    sampling: object  # cai.backends.Sampling
    patterns: list  # refusal regular expressions
    judges: list  # [Judge]: every judge, in the order given
    template: object  # the judge's multiple-choice template
    conversation: object
    questions: dict  # set name -> the judge's question
    pms: dict  # PM identity -> (label, directory): each run's last PM, identical ones once
    out: Path
    clear: list  # clear pairs (cai.feedback.clear_pairs_as_pairs) every judge also judges
    labelers: dict  # run name -> [model identity of each AI labeler its labels came from]


@dataclass
class Judge:
    name: str  # "judge" or "judges[i]"
    spec: dict  # make_backend arguments
    identity: str  # the backend identity (part of every judge key)
    model: str  # the model's identity without dtype or backend kernels: what self-preference compares


def model_identity(spec: dict) -> str:
    """A model's identity for self-preference: its weights and tokenizer (a transformers or vLLM model in any
    dtype is the same model), or the endpoint and served name."""
    if spec.get("backend", "transformers") in ("transformers", "vllm"):
        return resolve_model(str(spec["model"])).identity
    if spec["backend"] == "openai":
        return f"openai:{str(spec.get('base_url', '')).rstrip('/')}/{spec['model']}"
    return f"{spec['backend']}:{spec['model']}"


def run_labelers(run: Run) -> tuple[list[str], list[str]]:
    """The model identities of the AI labelers behind a run's labels (config.rl.yaml / config.dpo.yaml:
    feedback.labelers, else feedback.labeler; none for feedback.source=human), and notes on any that cannot be
    found."""
    found, notes = [], []
    for name in ("config.rl.yaml", "config.dpo.yaml"):
        fb = (run.configs.get(name) or {}).get("feedback") or {}
        if not fb or fb.get("source", "ai") == "human":
            continue
        for m in (fb.get("labelers") or [fb.get("labeler") or {}]):
            if not isinstance(m, dict) or not m.get("model"):
                continue
            try:
                found.append(model_identity(m))
            except CaiError as e:
                notes.append(f"{run.name}: labeler {m.get('model')} not found, so self-preference is not checked "
                             f"for it ({e})")
    return sorted(set(found)), notes


def read_inputs(run_paths: list[str], cfg) -> Inputs:
    runs = load_runs(run_paths)
    for name, j in cfg.all_judges():  # judge.backend=vllm: the extra and a GPU, checked before any work
        check_backend(j, name)
    if cfg.bootstrap < 0:
        raise CaiError(f"bootstrap={cfg.bootstrap}: expected 0 or more")
    if cfg.boilerplate_n < 1:
        raise CaiError(f"boilerplate_n={cfg.boilerplate_n}: expected 1 or more")
    sampling = sampling_from_config(cfg.sampling, "sampling")
    prompt_sets = {s: load_prompts(getattr(cfg, s)) for s in SETS}
    prompt_sets = {s: ps for s, ps in prompt_sets.items() if ps}
    if not prompt_sets:
        raise CaiError("red_team and helpful have no prompts; expected at least one prompt to compare on")
    models, notes = contenders(runs, cfg)
    judges = []
    for name, j in cfg.all_judges():
        spec = {"backend": j.backend, "model": j.model, "dtype": j.dtype, "device": j.device,
                "batch_size": j.batch_size, "trust_remote_code": j.trust_remote_code, "base_url": j.base_url,
                "tokenizer": j.tokenizer, "api_key_env": j.api_key_env, "concurrency": j.concurrency,
                **{k: getattr(j, k) for k in VLLM_OPTIONS}}
        judge = Judge(name, spec, expected_identity(spec), model_identity(spec))
        if any(judge.identity == other.identity for other in judges):
            raise CaiError(f"{name}: the same judge as an earlier one ({judge.identity}); expected distinct judges")
        judges.append(judge)
    labelers = {}
    for run in runs:
        labelers[run.name], run_notes = run_labelers(run)
        notes += run_notes
    clear = clear_pairs_as_pairs(load_labeled_set(cfg.clear_pairs)) if cfg.clear_pairs else []
    if cfg.clear_limit:
        clear = clear[:cfg.clear_limit]
    pms = {}
    for run in runs:
        pm = _last_round(run, "pm")
        if pm is not None:
            pms.setdefault(resolve_model(str(pm)).identity, (f"{run.name}/pm", pm))
    out = Path(cfg.out) if cfg.out else Path("reports") / "-vs-".join(Path(r.name).name for r in runs)
    return Inputs(runs, models, notes, prompt_sets, sampling, load_patterns(cfg.refusal_patterns), judges,
                  load_template(cfg.judge_template), load_template(cfg.conversation_template),
                  {"red_team": load_template(cfg.harmless_question).render(),
                   "helpful": load_template(cfg.helpful_question).render()}, pms, out, clear, labelers)


def _count(work: dict, name: str, stats) -> None:
    w = work.setdefault(name, {"computed": 0, "reused": 0, "seconds": 0.0})
    w["computed"] += stats.generated
    w["reused"] += stats.reused
    w["seconds"] += stats.seconds


def answer_all(inp: Inputs, cfg, store, work: dict) -> dict:
    """Every model answers every prompt of every set. Returns {set: {model: [answer record key per prompt]}}."""
    all_prompts = [p for ps in inp.prompt_sets.values() for p in ps]
    keys: dict = {s: {} for s in inp.prompt_sets}
    for c in inp.models:
        reqs = answer_requests(c, all_prompts, inp.sampling, cfg.seed)
        lazy = Lazy(lambda c=c: _load_backend(c.spec, c.identity))
        stats, _ = run_wave(reqs, store, lambda batch, lazy=lazy: generation(lazy.get(), inp.sampling)(batch),
                            inp.out / "plans", cfg.batch_size, f"answers {c.label}", c.identity, cfg.progress, unit="ans")
        lazy.close()
        _count(work, "answers", stats)
        i = 0
        for s, ps in inp.prompt_sets.items():
            keys[s][c.label] = [r.key for r in reqs[i:i + len(ps)]]
            i += len(ps)
    return keys


def judge_request(inp: Inputs, judge: Judge, s: str, prompt: str, a: str, b: str) -> Request:
    """The judge's multiple-choice request with answer `a` shown first, keyed by everything that determines it."""
    key = stable_hash({"kind": "judge", "prompt": prompt, "first": a, "second": b, "question": inp.questions[s],
                       "template": inp.template.sha, "conversation": inp.conversation.sha, "judge": judge.identity})
    messages = judge_messages(inp.template, inp.conversation, inp.questions[s], prompt, a, b)
    return Request(key, "judge", messages, {"set": s, "first_sha": stable_hash(a), "second_sha": stable_hash(b)})


def judge_all(inp: Inputs, cfg, store, answers: dict, work: dict, judge: Judge) -> tuple[dict, list[dict]]:
    """One judge on every prompt and every pair of models, in both orders, and on the clear pairs. Returns
    ({set: [{prompt_id, k, x, y, x_first, y_first}]}: the keys of the judge records with x's answer shown first,
    and with y's; [{pair_key, a_first, b_first}] for the clear pairs)."""
    labels = [c.label for c in inp.models]
    reqs, index = [], {s: [] for s in inp.prompt_sets}
    for s, ps in inp.prompt_sets.items():
        for k, p in enumerate(ps):
            for x, y in combinations(labels, 2):
                keys = []
                for first, second in ((x, y), (y, x)):
                    a, b = store[answers[s][first][k]]["text"], store[answers[s][second][k]]["text"]
                    r = judge_request(inp, judge, s, p.prompt, a, b)
                    r.meta["prompt_id"] = p.id
                    reqs.append(r)
                    keys.append(r.key)
                index[s].append({"prompt_id": p.id, "k": k, "x": x, "y": y, "x_first": keys[0], "y_first": keys[1]})
    clear_reqs, clear_index = [], []
    for pair in inp.clear:
        s = "red_team" if pair["category"] == "harmless" else "helpful"
        ra = judge_request(inp, judge, s, pair["prompt"], pair["answer_a"], pair["answer_b"])
        rb = judge_request(inp, judge, s, pair["prompt"], pair["answer_b"], pair["answer_a"])
        clear_reqs += [ra, rb]
        clear_index.append({"pair_key": pair["key"], "a_first": ra.key, "b_first": rb.key})
    lazy = Lazy(lambda: _load_backend(judge.spec, judge.identity))
    name = "judge" if len(inp.judges) == 1 else judge.name
    stats, _ = run_wave(reqs, store, judging(lazy), inp.out / "plans", judge.spec["batch_size"], name,
                        judge.identity, cfg.progress, unit="score")
    _count(work, "judge", stats)
    if clear_reqs:
        stats, _ = run_wave(clear_reqs, store, judging(lazy), inp.out / "plans", judge.spec["batch_size"],
                            f"{name} clear pairs", judge.identity, cfg.progress, unit="score")
        _count(work, "judge_clear", stats)
    lazy.close()
    return index, clear_index


def score_all(inp: Inputs, cfg, store, answers: dict, work: dict) -> dict:
    """Each run's last PM scores every answer. Returns {pm: {set: {model: [score record key per prompt]}}}."""
    out: dict = {}
    work.setdefault("pm_scores", {"computed": 0, "reused": 0, "seconds": 0.0})
    for pm_identity, (pm_label, pm_dir) in inp.pms.items():
        reqs, out[pm_label] = [], {s: {} for s in inp.prompt_sets}
        for s, ps in inp.prompt_sets.items():
            for label, keys in answers[s].items():
                out[pm_label][s][label] = []
                for p, answer_key in zip(ps, keys):
                    text = store[answer_key]["text"]
                    key = stable_hash({"kind": "pm-score", "pm": pm_identity, "prompt": p.prompt, "answer": text})
                    reqs.append(Request(key, "pm-score", [{"role": "user", "content": p.prompt},
                                                          {"role": "assistant", "content": text}], {"pm": pm_label}))
                    out[pm_label][s][label].append(key)
        lazy = Lazy(lambda d=pm_dir: load_pm(d, device=cfg.device))
        stats, _ = run_wave(reqs, store, pm_scoring(lazy, cfg.batch_size), inp.out / "plans", cfg.batch_size,
                            f"pm {pm_label}", pm_identity, cfg.progress, unit="ans")
        lazy.close()
        _count(work, "pm_scores", stats)
    return out


def judge_outcomes(store, judged_set: list[dict], labels: list[str], n: int) -> tuple[np.ndarray, int, int, int]:
    """One judge on one set: outcomes[k, i, j] = P(i better than j) on prompt k (both orders averaged, so the
    position bias cancels), and (position-consistent, decided, identical-answer) counts."""
    m = len(labels)
    outcomes = np.full((n, m, m), 0.5)
    consistent = decided = identical = 0
    for j in judged_set:
        p_xy, p_yx = store[j["x_first"]]["p_option_a"], store[j["y_first"]]["p_option_a"]
        x, y = labels.index(j["x"]), labels.index(j["y"])
        outcomes[j["k"], x, y] = (p_xy + 1 - p_yx) / 2
        outcomes[j["k"], y, x] = 1 - outcomes[j["k"], x, y]
        if j["x_first"] == j["y_first"]:  # identical answers: one request, outcome exactly 0.5
            identical += 1
            continue
        decided += 1
        consistent += (p_xy > 0.5) == (1 - p_yx > 0.5)
    return outcomes, consistent, decided, identical


def results(outcomes: np.ndarray, labels: list[str], bootstrap: int, seed) -> dict:
    """Win rates, win rate against all, and Elo with bootstrap intervals, from one set's outcomes."""
    mean = outcomes.mean(0)
    fit = elo_with_ci(outcomes, bootstrap, seed)
    return {"win_rates": {x: {y: float(mean[i, k]) for k, y in enumerate(labels) if k != i}
                          for i, x in enumerate(labels)},
            "win_rate_vs_all": {x: float(np.delete(mean[i], i).mean()) for i, x in enumerate(labels)},
            "elo": {x: {"elo": float(fit["elo"][i]),
                        "ci_low": None if fit["ci_low"] is None else float(fit["ci_low"][i]),
                        "ci_high": None if fit["ci_high"] is None else float(fit["ci_high"][i])}
                    for i, x in enumerate(labels)}}


def judges_report(inp: Inputs, cfg, store, judged: dict, clear_judged: dict, outcomes: dict, labels: list[str]) -> dict:
    """Each judge's clear-pair accuracy, position consistency and win rates, which judges are also a compared
    run's labeler (self-preference) and the results without them, the judges' agreement on the debiased
    outcomes (cai.agreement), and the model pairs they disagree on most."""
    names = [j.name for j in inp.judges]
    out: dict = {"judges": {}, "self_preference": [], "agreement": {}, "without_self_preference": None,
                 "disagreements": []}
    for j in inp.judges:
        runs = [r for r, ids in inp.labelers.items() if j.model in ids]
        cons = [judge_outcomes(store, judged[j.name][s], labels, len(ps))[1:3] for s, ps in inp.prompt_sets.items()]
        clear = None
        if clear_judged[j.name]:
            comps = [{"pair_key": c["pair_key"], "soft_label": (store[c["a_first"]]["p_option_a"]
                                                                + 1 - store[c["b_first"]]["p_option_a"]) / 2}
                     for c in clear_judged[j.name]]
            clear = clear_accuracy(comps, inp.clear)
            clear.pop("correct")
            for v in clear["by_category"].values():
                v.pop("correct")
        decided = sum(d for _, d in cons)
        out["judges"][j.name] = {
            "identity": j.identity, "labeler_of": runs, "clear_pairs": clear,
            "position_consistency": sum(c for c, _ in cons) / decided if decided else None,
            "win_rate_vs_all": {s: {x: float(np.delete(outcomes[j.name][s].mean(0)[i], i).mean())
                                    for i, x in enumerate(labels)} for s in inp.prompt_sets}}
        if runs:
            out["self_preference"].append({"judge": j.name, "identity": j.identity, "labeler_of": runs})
    selfish = {x["judge"] for x in out["self_preference"]}
    if selfish:
        rest = [n for n in names if n not in selfish]
        out["without_self_preference"] = {"judges": rest, "results": {
            s: results(np.mean([outcomes[n][s] for n in rest], axis=0), labels, cfg.bootstrap, [cfg.seed, si])
            for si, s in enumerate(inp.prompt_sets)} if rest else None}
    if len(names) > 1:
        units = []
        for s in inp.prompt_sets:
            rows = []
            for j in judged[names[0]][s]:
                if j["x_first"] == j["y_first"]:
                    continue  # identical answers: every judge gives 0.5 by construction
                x, y = labels.index(j["x"]), labels.index(j["y"])
                values = [float(outcomes[n][s][j["k"], x, y]) for n in names]
                rows.append(values)
                units.append({"set": s, "prompt_id": j["prompt_id"], "x": j["x"], "y": j["y"],
                              "p_x_better": dict(zip(names, values)), "spread": max(values) - min(values)})
            out["agreement"][s] = agreement_report(rows, names)
        units.sort(key=lambda u: -u["spread"])
        out["disagreements"] = units[:cfg.disagreements]
    return out


def tabulate(inp: Inputs, cfg, store, answers: dict, judged: dict, scored: dict, clear_judged: dict) -> dict:
    """Every number of the report, from the stored records. judged: {judge name: {set: index}}; the results are
    on the judges' mean outcome (one judge: its own)."""
    labels = [c.label for c in inp.models]
    names = [j.name for j in inp.judges]
    t = {"win_rates": {}, "win_rate_vs_all": {}, "elo": {}, "judge": {}, "answers": {}}
    per_judge: dict = {n: {} for n in names}
    for si, (s, ps) in enumerate(inp.prompt_sets.items()):
        consistent = decided = identical = 0
        for n in names:
            per_judge[n][s], c, d, i = judge_outcomes(store, judged[n][s], labels, len(ps))
            consistent, decided, identical = consistent + c, decided + d, identical + i
        outcomes = np.mean([per_judge[n][s] for n in names], axis=0)
        r = results(outcomes, labels, cfg.bootstrap, [cfg.seed, si])
        for k in ("win_rates", "win_rate_vs_all", "elo"):
            t[k][s] = r[k]
        t["judge"][s] = {"comparisons": len(judged[names[0]][s]), "identical_answers": identical // len(names),
                         "position_consistency": consistent / decided if decided else None}
        t["answers"][s] = {}
        for x in labels:
            recs = [store[k] for k in answers[s][x]]
            t["answers"][s][x] = {"answers": len(recs),
                                  "refusal_rate": sum(is_refusal(r["text"], inp.patterns) for r in recs) / len(recs),
                                  "mean_tokens": sum(r["completion_tokens"] for r in recs) / len(recs),
                                  "cut_off_rate": sum(r["finish_reason"] == "length" for r in recs) / len(recs)}
    t["judges"] = judges_report(inp, cfg, store, judged, clear_judged, per_judge, labels)
    answer_recs = {x: [store[k] for s in inp.prompt_sets for k in answers[s][x]] for x in labels}
    # repeated sentences / n-grams and distinct-n per model and set (cai.measures)
    t["degeneration"] = {s: {x: degeneration([store[k]["text"] for k in answers[s][x]]) for x in labels}
                         for s in inp.prompt_sets}
    t["boilerplate"] = {}
    for x, recs in answer_recs.items():
        b = boilerplate([r["text"] for r in recs], cfg.boilerplate_n)
        t["boilerplate"][x] = {**b, "flagged": b["share"] >= cfg.boilerplate_flag}
    t["pm_scores"] = {pm: {s: {x: sum(store[k]["score"] for k in keys) / len(keys) for x, keys in per.items()}
                           for s, per in sets.items()} for pm, sets in scored.items()}
    judge_recs = [store[k] for k in {j[f] for per in judged.values() for js in per.values() for j in js
                                     for f in ("x_first", "y_first")}]
    tokens = [r["prompt_tokens"] for r in judge_recs if "prompt_tokens" in r]
    t["cost"] = {
        "judge": {"labels": len(judge_recs), "prompt_tokens": sum(tokens) if tokens else None,
                  "tokens_per_label": sum(tokens) / len(tokens) if tokens else None,
                  "seconds_per_label": sum(r.get("seconds", 0.0) for r in judge_recs) / len(judge_recs)},
        "answers": {x: {"completion_tokens": sum(r["completion_tokens"] for r in recs),
                        "seconds_per_answer": sum(r.get("seconds", 0.0) for r in recs) / len(recs)}
                    for x, recs in answer_recs.items()}}
    return t


def compare(run_paths: list[str], cfg) -> dict:
    inp = read_inputs(run_paths, cfg)
    curves = {r.name: rl_curves(r) for r in inp.runs}
    labels = {r.name: label_report(r, cfg.disagreements) for r in inp.runs}
    diffs = config_diffs(inp.runs)
    for n in inp.notes:
        print(f"note: {n}")
    started = time.time()
    try:
        lock = RunLock(inp.out).__enter__()
    except CaiError:
        raise CaiError(f"out={inp.out}: another compare is writing this report; wait for it, or pick another "
                       "out=DIR") from None
    try:
        store, work = JsonlStore(inp.out / "steps.jsonl"), {}
        answers = answer_all(inp, cfg, store, work)
        judged, clear_judged = {}, {}
        for judge in inp.judges:
            judged[judge.name], clear_judged[judge.name] = judge_all(inp, cfg, store, answers, work, judge)
        scored = score_all(inp, cfg, store, answers, work)
        report = {
            "runs": [{"name": r.name, "path": str(r.path)} for r in inp.runs], "out": str(inp.out),
            "models": [{"label": c.label, "kind": c.kind, "aliases": c.aliases, "model": c.spec["model"],
                        "backend": c.spec["backend"], "identity": c.identity} for c in inp.models],
            "notes": inp.notes,
            "settings": {"judge": ", ".join(j.identity for j in inp.judges),
                         "judges": {j.name: j.identity for j in inp.judges}, "sampling": inp.sampling.as_dict(), "seed": cfg.seed,
                         "bootstrap": cfg.bootstrap, "boilerplate_n": cfg.boilerplate_n,
                         "sets": {s: {"path": getattr(cfg, s).path, "prompts": len(ps), "role": ROLE[s]}
                                  for s, ps in inp.prompt_sets.items()}},
            **tabulate(inp, cfg, store, answers, judged, scored, clear_judged),
            "curves": curves, "labels": labels, "config_diff": diffs,
            "work": {k: {**v, "seconds": round(v["seconds"], 2)} for k, v in work.items()},
            "records": {"answers": answers, "judge": judged[inp.judges[0].name], "pm_scores": scored,
                        **({"judges": judged} if len(inp.judges) > 1 else {}), "clear_pairs": clear_judged}}
        report["cost"]["judge"]["computed_now"] = work["judge"]["computed"]
        report["cost"]["runs"] = {run: [{k: d.get(k) for k in ("round", "pairs", "seconds_per_label", "label_seconds")}
                                        for d in lab["rounds"]] for run, lab in labels.items()}
        by_alias = {f"{r.name}/{kind}": c for r in inp.runs for kind, c in training_costs(r).items()}
        report["cost"]["models"] = {c.label: next((by_alias[a] for a in c.aliases if a in by_alias), None)
                                    for c in inp.models}
        report["plots"] = write_report(report, inp.out)
        report["seconds"] = round(time.time() - started, 1)
        write_atomic(inp.out / "report.json", json.dumps(finite_json(report), indent=1, ensure_ascii=False,
                                                           allow_nan=False))
        return report
    finally:
        lock.__exit__(None, None, None)


def print_summary(report: dict, out: Path) -> None:
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    sets = list(report["elo"])
    rows = []
    for m in report["models"]:
        x = m["label"]
        row = [x]
        for s in sets:
            e = report["elo"][s][x]
            ci = f" [{e['ci_low']:.1f}, {e['ci_high']:.1f}]" if e["ci_low"] is not None else ""
            row += [f"{e['elo']:.1f}{ci}", fmt(report["answers"][s][x]["refusal_rate"]),
                    fmt(report["degeneration"][s][x]["repetition_share"])]
        row += [fmt(sum(report["answers"][s][x]["mean_tokens"] for s in sets) / len(sets), "{:.1f}"),
                fmt(report["boilerplate"][x]["share"])]
        rows.append(row)
    header = ["model"] + [h for s in sets for h in (f"{ROLE[s]} Elo", f"refusal ({s})", f"repeats ({s})")]
    header += ["tokens", "boilerplate"]
    print("\n" + table(rows, tuple(header)))
    costs = [(x, c) for x, c in report["cost"].get("models", {}).items() if c]
    if costs:
        print("\nwhat each trained model cost (labels and compute, every round that led to it)")
        print(table([(x, c["method"], c["ai_labels"], c["human_labels"], c["label_calls"], c["tokens_generated"],
                      f"{c['data_seconds']:.1f}", f"{c['train_seconds']:.1f}") for x, c in costs],
                    ("model", "method", "AI labels", "human labels", "label calls", "tokens generated",
                     "data s", "train s")))
    w = report["work"]
    print(f"\nanswers computed {w['answers']['computed']}, reused {w['answers']['reused']}; judge scores computed "
          f"{w['judge']['computed']}, reused {w['judge']['reused']}; PM scores computed {w['pm_scores']['computed']}, "
          f"reused {w['pm_scores']['reused']}")
    print(f"report: {out / 'report.md'}  {out / 'report.html'}  ({report['seconds']} s)\n")


@cli_main
def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print("\n".join(help_text(CompareConfig)))
        return 0
    run_paths = [a for a in argv if "=" not in a]
    cfg = build_config(CompareConfig, {}, "command line", parse_overrides([a for a in argv if "=" in a]))
    report = compare(run_paths, cfg)
    print_summary(report, Path(report["out"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
