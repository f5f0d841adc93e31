"""stage=rl (RL-CAI), top to bottom.

For each round r = 1..rounds (Bai et al. 2022 section 4; `rounds > 1` is online RLAIF):
  1. the current policy (round 1: this run's SL-CAI model) samples two answers per prompt;
  2. the feedback model labels each pair (cai.feedback) -> rl/round-r/comparisons.jsonl + label diagnostics;
  3. a preference model is trained from the SL-CAI model on all comparisons so far -> rl/round-r/pm/;
  4. RL against the PM: PPO with a per-token KL penalty to the SL-CAI model (cai.train.ppo), or RLOO / GRPO
     through TRL (cai.train.group_rl), whose KL anchor is the SL-CAI model too -> rl/round-r/policy/.
Every generated answer and every label is a keyed record in rl/steps.jsonl, so reruns and resumes reuse them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from cai.backends.vllm_backend import require_vllm
from cai.config import key_dict
from cai.errors import CaiError
from cai.io import read_jsonl, write_atomic, write_jsonl_atomic
from cai.launch import barrier, is_main, on_main, sharded_launch
from cai.models import resolve_model
from cai.prompts import load_labeled_set
from cai.records import stable_hash
from cai.runs import RunLock, run_dir_for, start_run
from cai.stages.pairs import (
    add_costs,
    clear_line,
    human_comparisons,
    pair_inputs,
    policy_ref,
    print_diagnostics,
    ptx_data_path,
    ptx_examples,
    read_inputs,
    round_comparisons,
    round_cost,
)
from cai.store import JsonlStore
from cai.train.common import TRAIN_INFO, reuse_or_train, swap_into_place, trained_model_matches
from cai.train.group_rl import train_group_rl
from cai.train.pm import load_pm, pm_training_key, score_answers, train_pm
from cai.train.ppo import run_ppo, value_init_for


def run_rl(cfg) -> dict:
    if cfg.algorithm in ("rloo", "grpo") and getattr(cfg, cfg.algorithm).use_vllm:
        require_vllm(f"{cfg.algorithm}.use_vllm=true")
    if sharded_launch():
        raise CaiError(f"stage=rl under {sharded_launch()}: the PM that scores answers and PPO's frozen reference "
                       "are whole models on every process; launch stage=rl with pipelines/accelerate/ddp.yaml or "
                       "zero2.yaml")
    constitution, prompts, settings, prompt_sets = read_inputs(cfg)
    # with source=ai, human labels (when given) are only compared with the AI labels
    human = human_comparisons(cfg)
    run_dir = run_dir_for(cfg)
    sl_ref = policy_ref(cfg, run_dir)
    ptx = ptx_examples(ptx_data_path(cfg, run_dir)) if cfg.algorithm == "ppo" and cfg.ppo.ptx_coef > 0 else None
    chains, contrast = pair_inputs(cfg, run_dir, constitution) if cfg.feedback.source != "human" else (None, None)
    if cfg.pm.clear_pairs:  # read after the PM trains; checked here, before any work
        load_labeled_set(cfg.pm.clear_pairs)
    with RunLock(run_dir):  # launched: the main process holds it for all (cai.launch)
        rl_dir = run_dir / "rl"
        rl_dir.mkdir(parents=True, exist_ok=True)
        metrics = start_run(run_dir, cfg, constitution)
        store = JsonlStore(rl_dir / "steps.jsonl") if is_main() else None
        started = time.time()
        policy = sl_ref
        all_comparisons: list[dict] = []
        rounds = []
        for r in range(1, cfg.rounds + 1):
            rdir = rl_dir / f"round-{r}"

            def label_round():  # launched: the main process only; the others read its comparisons.jsonl
                comps, diag, counts = round_comparisons(cfg, policy.path, prompts, constitution, settings, store,
                                                        rl_dir / "plans", f"round {r}", human, chains, contrast,
                                                        prompt_sets, already=all_comparisons)
                write_jsonl_atomic(rdir / "comparisons.jsonl", comps)
                write_atomic(rdir / "label_diagnostics.json", json.dumps({**diag, **counts}, indent=1))
                print_diagnostics(f"round {r}/{cfg.rounds}: {cfg.feedback.source} labels", diag, counts)
                metrics.log({f"rl/labels/{k}": v for k, v in {**diag, **counts}.items() if v is not None}, step=r)
                write_jsonl_atomic(rl_dir / "comparisons.jsonl", all_comparisons + comps)
                return {**diag, **counts}

            labels = on_main(label_round)
            round_comps = read_jsonl(rdir / "comparisons.jsonl")
            all_comparisons = read_jsonl(rl_dir / "comparisons.jsonl")  # every round's, on every process

            # the PM: trained from the SL-CAI model on every comparison so far (keyed: reused when unchanged)
            data = (rl_dir / "comparisons.jsonl").read_bytes()
            pm_key = pm_training_key(hashlib.sha256(data).hexdigest(), sl_ref, cfg.pm, cfg.seed)
            pm_summary = reuse_or_train(rdir / "pm", pm_key, lambda: train_pm(
                all_comparisons, sl_ref, cfg.pm, cfg.seed, rdir / "pm", rl_dir / "checkpoints", metrics, pm_key,
                device=cfg.policy.device, progress=cfg.progress))
            round_summary = {"round": r, "labels": labels, "pm": pm_summary}
            if cfg.algorithm != "none":
                pm_model, pm_tok = load_pm(rdir / "pm", device=cfg.policy.device)

                def score(ps, answers):
                    return score_answers(pm_model, pm_tok, ps, answers, batch_size=cfg.pm.batch_size * 2)

                texts = [p.prompt for p in prompts]
                if cfg.algorithm == "ppo":
                    rl_summary = _ppo_round(cfg, policy, sl_ref, pm_key, score, texts, rdir, ptx, metrics)
                else:
                    sub = cfg.rloo if cfg.algorithm == "rloo" else cfg.grpo
                    key = stable_hash([cfg.algorithm, policy.identity, sl_ref.identity, pm_key, key_dict(sub), cfg.seed])
                    card = f"# RL-CAI policy ({cfg.algorithm})\n\nFrom {policy.identity}, PM key {pm_key}.\n"
                    rl_summary = reuse_or_train(rdir / "policy", key, lambda: train_group_rl(
                        cfg.algorithm, policy, score, texts, sub, cfg.seed, rdir, metrics, key, card,
                        device=cfg.policy.device, progress=cfg.progress, reference=sl_ref))
                del pm_model
                round_summary["rl"] = rl_summary
                policy = resolve_model(str(rdir / "policy"))
            train_seconds = float(pm_summary.get("seconds", 0.0)) + float((round_summary.get("rl") or {}).get(
                "seconds", 0.0))
            round_summary["cost"] = round_cost(labels or {}, round_comps, train_seconds,
                                               int((round_summary.get("rl") or {}).get("rollout_tokens", 0)))
            rounds.append(round_summary)
        if not is_main():
            return {"rounds": rounds}
        summary = {"run": str(run_dir), "algorithm": cfg.algorithm, "rounds": rounds,
                   "cost": add_costs([r["cost"] for r in rounds]), "seconds": round(time.time() - started, 1)}
        write_atomic(rl_dir / "summary.json", json.dumps(summary, indent=1, default=str))
        print_rl_summary(summary)
        return summary


def _ppo_round(cfg, policy, sl_ref, pm_key: str, score, texts: list[str], rdir: Path, ptx: list[dict] | None,
               metrics) -> dict:
    """PPO keyed like every trained model: same inputs -> reuse rdir/policy; else train in rdir/ppo/<key>/
    (checkpoints there, so a killed run resumes only the same job) and swap the policy into place."""
    # gradient_checkpointing trades memory for time and trains the same model: it stays out of the key, so runs
    # from before the setting existed are reused and turning it on or off retrains nothing
    settings = {k: v for k, v in key_dict(cfg.ppo).items() if k != "gradient_checkpointing"}
    key = stable_hash(["ppo", policy.identity, sl_ref.identity, pm_key, settings, texts, ptx])
    if trained_model_matches(rdir / "policy", key):
        return {**json.loads((rdir / "policy" / TRAIN_INFO).read_text()), "reused": True}
    work = rdir / "ppo" / key
    summary = run_ppo(policy, score, texts, cfg.ppo, work, metrics,
                      value_init=value_init_for(cfg.ppo.value_init, rdir / "pm"),
                      reference=sl_ref, sft_examples=ptx, progress=cfg.progress)
    summary = {**summary, "key": key}
    if is_main():
        write_atomic(work / "policy" / TRAIN_INFO, json.dumps(summary, indent=1, default=str))
        swap_into_place(work / "policy", rdir / "policy")
        shutil.rmtree(rdir / "ppo", ignore_errors=True)  # the policy is in place: its checkpoints are done with
    barrier()  # launched: the others load this policy next
    return summary


def print_rl_summary(summary: dict) -> None:
    print("\nRL-CAI")
    for r in summary["rounds"]:
        pm = r["pm"]
        acc = pm.get("heldout", {}).get("accuracy")
        print(f"  round {r['round']}: {r['labels']['pairs']} pairs, PM held-out accuracy "
              f"{'-' if acc is None else f'{acc:.3f}'}{' (reused)' if pm.get('reused') else ''}")
        clear = pm.get("clear_pairs")
        if clear and clear.get("accuracy") is not None:
            print(f"    PM on clear pairs it never trained on: {clear_line(clear)}")
        lc, raw = pm.get("length_correction"), pm.get("clear_pairs_uncorrected")
        if lc and lc.get("enabled"):
            print(f"    PM length trend (fitted on its {lc['answers']} training answers): {lc['slope']:+.4f} a token, "
                  f"correlation {lc['corr']:+.2f}; subtracted from every reward"
                  + (f" (held-out accuracy without it: {pm['heldout_accuracy_uncorrected']:.3f})"
                     if pm.get("heldout_accuracy_uncorrected") is not None else "")
                  + (f"; uncorrected on the clear pairs: {clear_line(raw)}" if raw and raw.get("accuracy") is not None
                     else ""))
        calibration = pm.get("heldout", {}).get("calibration") or []
        if calibration:
            print("    PM calibration (held out): " + "  ".join(
                f"[{b['lo']:.1f},{b['hi']:.1f}) n={b['count']} pred={b['mean_predicted']:.2f} label={b['mean_label']:.2f}"
                for b in calibration))
        rl = r.get("rl")
        if rl:
            first = rl.get("first_reward_mean", rl.get("first_reward"))  # PPO's keys, then TRL's
            last = rl.get("last_reward_mean", rl.get("last_reward"))
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            print(f"    {summary['algorithm']}: {rl.get('steps')} steps, reward {fmt(first)} -> {fmt(last)}, "
                  f"KL {fmt(rl.get('last_kl'))}{' (reused)' if rl.get('reused') else ''}")
    print(f"run: {summary['run']}  total {summary['seconds']} s\n")
