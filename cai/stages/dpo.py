"""stage=dpo: sample pairs from the starting policy, label them (AI feedback), then train with DPO on the labeled
pairs instead of a PM and PPO -> rl/dpo/policy/ (Rafailov et al. 2023; cai.train.dpo)."""

from __future__ import annotations

import json
import time

from cai.io import read_jsonl, write_atomic, write_jsonl_atomic
from cai.launch import is_main, on_main
from cai.runs import RunLock, run_dir_for, start_run
from cai.stages.pairs import (
    human_comparisons,
    pair_inputs,
    policy_ref,
    print_diagnostics,
    read_inputs,
    round_comparisons,
)
from cai.store import JsonlStore
from cai.train.dpo import train_dpo


def run_dpo(cfg) -> dict:
    constitution, prompts, settings, prompt_sets = read_inputs(cfg)
    run_dir = run_dir_for(cfg)
    policy = policy_ref(cfg, run_dir)
    human = human_comparisons(cfg)  # with source=ai, only compared with the AI labels
    chains, contrast = pair_inputs(cfg, run_dir, constitution) if cfg.feedback.source != "human" else (None, None)
    with RunLock(run_dir):  # launched: the main process holds it for all (cai.launch)
        rl_dir = run_dir / "rl"
        rl_dir.mkdir(parents=True, exist_ok=True)
        metrics = start_run(run_dir, cfg, constitution)
        started = time.time()

        def label():  # launched: the main process only; the others read its comparisons.jsonl
            comps, diag, counts = round_comparisons(cfg, policy.path, prompts, constitution, settings,
                                                    JsonlStore(rl_dir / "steps.jsonl"), rl_dir / "plans", "dpo",
                                                    human, chains, contrast, prompt_sets)
            write_jsonl_atomic(rl_dir / "dpo" / "comparisons.jsonl", comps)
            print_diagnostics(f"{cfg.feedback.source} labels", diag, counts)
            return {**diag, **counts}

        labels = on_main(label)
        comps = read_jsonl(rl_dir / "dpo" / "comparisons.jsonl")
        card = (f"# DPO policy\n\nFrom {policy.identity} on {len(comps)} pairs labeled by {cfg.feedback.source} "
                f"feedback ({constitution.name}).\n")
        result = train_dpo(comps, policy, cfg.dpo, cfg.seed, rl_dir / "dpo" / "policy", rl_dir / "checkpoints",
                           metrics, card, device=cfg.policy.device, progress=cfg.progress,
                           trust_remote_code=cfg.policy.trust_remote_code)
        if not is_main():
            return {"dpo": result}
        summary = {"run": str(run_dir), "labels": labels, "dpo": result,
                   "seconds": round(time.time() - started, 1)}
        write_atomic(rl_dir / "dpo" / "summary.json", json.dumps(summary, indent=1))
        print(f"\nDPO: {result['pairs']} pairs ({result['dropped']} dropped near 0.5), {result['steps']} steps, "
              f"loss {result['train_loss']:.4f}; run {run_dir}  total {summary['seconds']} s\n")
        return summary
