"""stage=dpo: sample pairs from the policy, label them (AI feedback, or the configured feedback source), then train
with DPO on the labeled pairs instead of a PM and PPO (Rafailov et al. 2023; cai.train.dpo).

rounds=1 is offline DPO: pairs from the starting policy only -> rl/dpo/comparisons.jsonl, rl/dpo/policy/.
rounds=N > 1 is online (iterated) DPO: round r samples pairs from round r-1's policy, labels them, and runs DPO
from that policy on them -> rl/dpo/round-r/ (round 1 stays in rl/dpo/, so an offline run grows into an online one
by rerunning with more rounds). Every answer and label is a keyed record in rl/steps.jsonl and every round's
policy is keyed by its pairs and start, so a rerun or a resumed run recomputes nothing it has. Each round records
what its labels and compute cost (rl/dpo/summary.json `cost`), which cai.compare sets beside PPO's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cai.io import read_jsonl, write_atomic, write_jsonl_atomic
from cai.launch import is_main, on_main
from cai.models import resolve_model
from cai.prompts import load_labeled_set
from cai.runs import RunLock, run_dir_for, start_run
from cai.stages.pairs import (
    add_costs,
    clear_line,
    human_comparisons,
    pair_inputs,
    policy_ref,
    print_diagnostics,
    read_inputs,
    round_comparisons,
    round_cost,
)
from cai.store import JsonlStore
from cai.train.dpo import train_dpo


def dpo_round_dir(rl_dir: Path, r: int) -> Path:
    """Round 1 (offline DPO) in rl/dpo/, later rounds in rl/dpo/round-r/."""
    return rl_dir / "dpo" if r == 1 else rl_dir / "dpo" / f"round-{r}"


def run_dpo(cfg) -> dict:
    constitution, prompts, settings, prompt_sets = read_inputs(cfg)
    run_dir = run_dir_for(cfg)
    start_policy = policy_ref(cfg, run_dir)
    human = human_comparisons(cfg)  # with source=ai, only compared with the AI labels
    chains, contrast = pair_inputs(cfg, run_dir, constitution) if cfg.feedback.source != "human" else (None, None)
    clear = load_labeled_set(cfg.dpo.clear_pairs) if cfg.dpo.clear_pairs else None  # checked before any work
    with RunLock(run_dir):  # launched: the main process holds it for all (cai.launch)
        rl_dir = run_dir / "rl"
        rl_dir.mkdir(parents=True, exist_ok=True)
        metrics = start_run(run_dir, cfg, constitution)
        store = JsonlStore(rl_dir / "steps.jsonl") if is_main() else None
        started = time.time()
        policy = start_policy
        earlier: list[dict] = []  # every earlier round's comparisons: a pair is trained on in one round only
        rounds = []
        for r in range(1, cfg.rounds + 1):
            rdir = dpo_round_dir(rl_dir, r)
            title = f"round {r}/{cfg.rounds}: {cfg.feedback.source} labels" if cfg.rounds > 1 else \
                f"{cfg.feedback.source} labels"

            def label():  # launched: the main process only; the others read its comparisons.jsonl
                comps, diag, counts = round_comparisons(cfg, policy.path, prompts, constitution, settings, store,
                                                        rl_dir / "plans", "dpo" if r == 1 else f"dpo round {r}",
                                                        human, chains, contrast, prompt_sets, already=earlier)
                write_jsonl_atomic(rdir / "comparisons.jsonl", comps)
                write_atomic(rdir / "label_diagnostics.json", json.dumps({**diag, **counts}, indent=1))
                print_diagnostics(title, diag, counts)
                metrics.log({f"rl/dpo/labels/{k}": v for k, v in {**diag, **counts}.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=r)
                return {**diag, **counts}

            labels = on_main(label)
            comps = read_jsonl(rdir / "comparisons.jsonl")
            card = (f"# DPO policy{f' (online, round {r} of {cfg.rounds})' if cfg.rounds > 1 else ''}\n\n"
                    f"From {policy.identity} on {len(comps)} pairs it sampled, labeled by {cfg.feedback.source} "
                    f"feedback ({constitution.name}).\n")
            result = train_dpo(comps, policy, cfg.dpo, cfg.seed, rdir / "policy", rl_dir / "checkpoints",
                               metrics, card, device=cfg.policy.device, progress=cfg.progress,
                               trust_remote_code=cfg.policy.trust_remote_code, clear=clear)
            rounds.append({"round": r, "policy_from": policy.identity, "labels": labels, "dpo": result,
                           "cost": round_cost(labels or {}, comps, float(result.get("seconds", 0.0)))})
            earlier += comps
            policy = resolve_model(str(rdir / "policy"))
        if not is_main():
            return {"rounds": rounds}
        summary = {"run": str(run_dir), "mode": "online" if cfg.rounds > 1 else "offline", "rounds_run": cfg.rounds,
                   "labels": rounds[0]["labels"], "dpo": rounds[-1]["dpo"], "rounds": rounds,
                   "cost": add_costs([x["cost"] for x in rounds]), "seconds": round(time.time() - started, 1)}
        write_atomic(rl_dir / "dpo" / "summary.json", json.dumps(summary, indent=1, default=str))
        print_dpo_summary(summary)
        return summary


def print_dpo_summary(summary: dict) -> None:
    print(f"\nDPO ({summary['mode']})")
    for x in summary["rounds"]:
        d, c = x["dpo"], x["cost"]
        print(f"  round {x['round']}: {d['pairs']} pairs ({d['dropped']} dropped near 0.5), {d['steps']} steps, "
              f"loss {d['train_loss']:.4f}{' (reused)' if d.get('reused') else ''}; cost: {c['ai_labels']} AI + "
              f"{c['human_labels']} human labels ({c['label_calls']} label calls), {c['tokens_generated']} tokens "
              f"generated, {c['seconds']} s")
    clear = summary["dpo"].get("clear_pairs")
    if clear and clear.get("accuracy") is not None:
        print(f"  implicit reward beta*log(pi/pi_ref) on clear pairs it never trained on: {clear_line(clear)}; "
              f"likelihood puts the better answer first: starting model {clear['start_likelihood_accuracy']:.3f}, "
              f"DPO policy {clear['policy_likelihood_accuracy']:.3f}")
    c = summary["cost"]
    print(f"  total cost: {c['ai_labels'] + c['human_labels']} labels, {c['tokens_generated']} tokens generated, "
          f"{c['seconds']} s of compute; run {summary['run']}  total {summary['seconds']} s\n")
