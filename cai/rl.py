"""stage=rl (RL-CAI) and stage=dpo, top to bottom.

For each round r = 1..rounds (Bai et al. 2022 section 4; `rounds > 1` is online RLAIF):
  1. the current policy (round 1: this run's SL-CAI model) samples two answers per prompt;
  2. the feedback model labels each pair (cai.feedback) -> rl/round-r/comparisons.jsonl + label diagnostics;
  3. a preference model is trained from the SL-CAI model on all comparisons so far -> rl/round-r/pm/;
  4. RL against the PM: PPO with a per-token KL penalty to the round's starting policy (cai.ppo), or RLOO /
     GRPO through TRL (cai.online) -> rl/round-r/policy/.
stage=dpo runs steps 1-2 and trains with DPO on the labeled pairs instead -> rl/dpo/policy/.
Every generated answer and every label is a keyed record in rl/steps.jsonl, so reruns and resumes reuse them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from cai.config import F, ModelConfig, PMConfig, PPOConfig, PromptSource, SamplingConfig, config_dict
from cai.dpo import DPOConfig
from cai.errors import CaiError
from cai.launch import barrier, is_main, on_main, sharded_launch
from cai.online import GroupRLConfig
from cai.store import JsonlStore, RunLock, read_jsonl, write_atomic, write_jsonl_atomic


@dataclass
class FeedbackConfig:
    source: str = F("ai", "ai: AI labels | human: imported human labels only | mixed: both, by mixed_rule")
    human_labels: str = F("", "JSONL/CSV of human comparisons (prompt, answer_a, answer_b, choice|probability, annotator)")
    human_rankings: str = F("", "JSONL of human rankings of K answers (prompt, ranking, annotator) -> K(K-1)/2 pairs")
    mixed_rule: str = F("human_first", "source=mixed: human_first (human labels wherever present, AI elsewhere) | "
                                       "by_category (human for helpful prompts, AI for red-team: the paper's hybrid)")
    labeler: ModelConfig = F(ModelConfig(), "the feedback model that compares answers")
    principles_per_pair: int = F(2, "feedback principles sampled per pair; their labels are averaged")
    conversation_template: str = F("prompts/templates/conversation.txt", "renders the conversation slot")
    template: str = F("prompts/templates/feedback_mc.txt", "multiple-choice prompt; last line starts the answer "
                                                           "(feedback_mc_shared_prefix.txt labels ~2x faster but was "
                                                           "less accurate with SmolLM2: BENCHMARKS.md)")
    cot: bool = F(False, "chain of thought: reason first, then score the letters (probabilities clamped)")
    cot_template: str = F("prompts/templates/feedback_cot.txt", "chain-of-thought prompt")
    cot_answer_template: str = F("prompts/templates/feedback_cot_answer.txt", "text after the reasoning, before the letter")
    cot_max_new_tokens: int = F(128, "tokens of reasoning at most")
    cot_clamp_low: float = F(0.4, "CoT probabilities are clamped to [low, high] (the paper's 0.4-0.6)")
    cot_clamp_high: float = F(0.6, "see cot_clamp_low")


@dataclass
class PairStageConfig:
    """Settings shared by the stages that sample answer pairs and label them (rl, dpo)."""

    stage: str = F("rl", "which stage this config is for")
    run: str = F("default", "run name: outputs go to <runs_dir>/<run>/")
    runs_dir: str = F("runs", "where run directories live")
    seed: int = F(0, "seed for pair sampling, principle choice and training")
    constitution: str = F("constitutions/default.yaml", "constitution file (its feedback principles are used)")
    policy: ModelConfig = F(ModelConfig(model="sl"), "starting policy: 'sl' = this run's SL-CAI model, or a model")
    pair_sampling: SamplingConfig = F(SamplingConfig(max_new_tokens=64, temperature=1.0, top_p=1.0),
                                      "sampling of the two answers per prompt")
    red_team: PromptSource = F(PromptSource(path="prompts/sets/red_team_train.jsonl"), "red-team prompts")
    helpful: PromptSource = F(PromptSource(path="prompts/sets/helpful_train.jsonl"), "helpful prompts")
    helpful_pairs: bool = F(True, "also sample and label pairs for the helpful prompts")
    feedback: FeedbackConfig = F(FeedbackConfig(), "AI feedback labeling")
    report_to: str = F("none", "none | tensorboard (metrics also go to <run>/tensorboard/)")
    progress: bool = F(True, "show progress bars")


@dataclass
class RLConfig(PairStageConfig):
    pm: PMConfig = F(PMConfig(), "preference model training")
    algorithm: str = F("ppo", "ppo | rloo | grpo | none (stop after the PM)")
    ppo: PPOConfig = F(PPOConfig(), "PPO settings (algorithm=ppo)")
    rloo: GroupRLConfig = F(GroupRLConfig(), "RLOO settings (algorithm=rloo)")
    grpo: GroupRLConfig = F(GroupRLConfig(), "GRPO settings (algorithm=grpo)")
    rounds: int = F(1, "online RLAIF rounds: sample from the current policy, label, retrain the PM, RL again")


@dataclass
class DPOStageConfig(PairStageConfig):
    stage: str = F("dpo", "which stage this config is for")
    dpo: DPOConfig = F(DPOConfig(), "DPO training")


def _policy_ref(cfg, run_dir: Path):
    from cai.models import resolve_model

    if cfg.policy.model == "sl":
        sl_model = run_dir / "sl" / "model"
        if not (sl_model / "config.json").exists():
            raise CaiError(f"policy.model=sl: {sl_model} has no trained SL-CAI model; run stage=sl with "
                           f"run={cfg.run} first, or set policy.model to a model")
        return resolve_model(str(sl_model))
    return resolve_model(cfg.policy.model)


def _sft_examples(run_dir: Path) -> list[dict]:
    """The SL stage's SFT conversations, for PPO-ptx (InstructGPT's pretraining-mix term)."""
    from cai.store import read_jsonl

    path = run_dir / "sl" / "sft.jsonl"
    if not path.exists():
        raise CaiError(f"ppo.ptx_coef > 0 mixes in the SFT data, but {path} does not exist; run stage=sl first")
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_jsonl(path)]


def _inputs(cfg):
    """Read and check every input before anything is written."""
    from cai.constitution import load_constitution
    from cai.feedback import LabelSettings
    from cai.backends import Sampling, check_backend, sampling_from_config
    from cai.prompts import load_prompts
    from cai.templates import load_template

    if cfg.feedback.source not in ("ai", "human", "mixed"):
        raise CaiError(f"feedback.source={cfg.feedback.source}: expected ai, human or mixed")
    constitution = load_constitution(cfg.constitution)
    prompts = load_prompts(cfg.red_team) + (load_prompts(cfg.helpful) if cfg.helpful_pairs else [])
    unique = {p.prompt: p for p in reversed(prompts)}  # the same text twice would give the same pair twice
    prompts = [p for p in prompts if unique[p.prompt] is p]
    if not prompts:
        raise CaiError("no prompts to sample pairs for (red_team and helpful are empty)")
    sampling_from_config(cfg.pair_sampling, "pair_sampling")
    f = cfg.feedback
    if f.source != "human":  # source=human samples and labels nothing
        check_backend(cfg.policy, "policy")
        check_backend(f.labeler, "feedback.labeler")
    settings = LabelSettings(
        seed=cfg.seed, principles_per_pair=f.principles_per_pair,
        conversation_template=load_template(f.conversation_template), template=load_template(f.template),
        cot=f.cot, cot_template=load_template(f.cot_template), cot_answer=load_template(f.cot_answer_template),
        cot_sampling=Sampling(max_new_tokens=f.cot_max_new_tokens, temperature=0.0),
        cot_clamp=(f.cot_clamp_low, f.cot_clamp_high))
    if f.principles_per_pair < 1:
        raise CaiError(f"feedback.principles_per_pair={f.principles_per_pair}: expected 1 or more")
    if f.principles_per_pair > len(constitution.feedback):
        raise CaiError(f"feedback.principles_per_pair={f.principles_per_pair}: {cfg.constitution} has only "
                       f"{len(constitution.feedback)} feedback principles")
    return constitution, prompts, settings


def _human_comparisons(cfg) -> list[dict]:
    """Human labels: imported comparisons and rankings, then the run's labeling-page labels (`cai.label`);
    required for feedback.source=human|mixed."""
    from cai.human import load_human_comparisons, load_human_rankings
    from cai.label import page_comparisons
    from cai.pipeline import run_dir_for

    f = cfg.feedback
    human = load_human_comparisons(f.human_labels) if f.human_labels else []
    human += load_human_rankings(f.human_rankings) if f.human_rankings else []
    keys = {c["key"] for c in human}  # page labels exported and imported again count once
    human += [c for c in page_comparisons(run_dir_for(cfg)) if c["key"] not in keys]
    if f.source != "ai" and not human:
        raise CaiError(f"feedback.source={f.source} needs human labels: feedback.human_labels=FILE and/or "
                       f"feedback.human_rankings=FILE, or labels from the labeling page "
                       f"(python -m cai.label run={cfg.run})")
    return human


def _backend(model_cfg: ModelConfig, model: str):
    from cai.backends import make_backend

    from cai.pipeline import backend_options

    b = make_backend(model_cfg.backend, model, **backend_options(model_cfg))
    if hasattr(b, "progress"):
        b.progress = False
    return b


def sample_and_label(cfg, policy_path: str, prompts, constitution, settings, store: JsonlStore, plan_dir: Path,
                     label: str, human: list[dict] | None = None) -> tuple[list[dict], dict, dict]:
    """Pairs from the policy, AI labels, diagnostics. Returns (comparisons, diagnostics, counts)."""
    from cai.backends import release, sampling_from_config
    from cai.feedback import label_diagnostics, label_pairs, sample_pairs

    sampling = sampling_from_config(cfg.pair_sampling, "pair_sampling")
    policy_backend = _backend(cfg.policy, policy_path)
    pairs, pair_stats = sample_pairs(prompts, policy_backend, sampling, cfg.seed, store, plan_dir,
                                     cfg.policy.batch_size, cfg.progress, label=f"{label} pairs")
    release(policy_backend)  # vLLM: shut its engine down before the labeler takes the GPU
    del policy_backend
    labeler = _backend(cfg.feedback.labeler, cfg.feedback.labeler.model)
    t0 = time.time()
    comparisons, label_stats = label_pairs(pairs, constitution, settings, labeler, store, plan_dir,
                                           cfg.feedback.labeler.batch_size, cfg.progress)
    label_seconds = time.time() - t0
    release(labeler)
    del labeler
    diag = label_diagnostics(comparisons, human)
    counts = {"pairs": len(pairs), "answers_generated": pair_stats.generated, "answers_reused": pair_stats.reused,
              "scores_computed": label_stats.generated, "scores_reused": label_stats.reused,
              "label_seconds": round(label_seconds, 1),
              "seconds_per_label": round(label_stats.seconds / max(label_stats.generated, 1), 4)}
    return comparisons, diag, counts


def print_diagnostics(title: str, diag: dict, counts: dict) -> None:
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    print(f"\n{title}")
    if diag.get("source") == "human":
        print(f"  {diag['pairs']} human comparisons from {diag['annotators']} annotator(s), "
              f"mean |p-0.5| {fmt(diag['mean_margin'])}")
        return
    print(f"  pairs {counts['pairs']} (answers generated {counts['answers_generated']}, reused "
          f"{counts['answers_reused']}); scores computed {counts['scores_computed']}, reused {counts['scores_reused']}")
    print(f"  position consistency {fmt(diag['position_consistency'])}  mean |p-0.5| {fmt(diag['mean_margin'])}  "
          f"near 0.5 {fmt(diag['share_near_half'])}  human agreement {fmt(diag['human_agreement'])} "
          f"(shared {diag['human_shared']})")


def run_rl(cfg) -> dict:
    from cai.models import resolve_model
    from cai.pm import load_pm, pm_training_key, score_answers, train_pm
    from cai.training import trained_model_matches

    if cfg.algorithm not in ("ppo", "rloo", "grpo", "none"):
        raise CaiError(f"algorithm={cfg.algorithm}: expected ppo, rloo, grpo or none")
    if cfg.ppo.value_init not in ("pm", "policy"):
        raise CaiError(f"ppo.value_init={cfg.ppo.value_init}: expected pm or policy")
    if cfg.rounds < 1:
        raise CaiError(f"rounds={cfg.rounds}: expected 1 or more")
    if cfg.rounds > 1 and cfg.algorithm == "none":
        raise CaiError(f"rounds={cfg.rounds} with algorithm=none: later rounds would sample from the same policy "
                       "and repeat round 1; set an algorithm or rounds=1")
    if cfg.algorithm in ("rloo", "grpo") and getattr(cfg, cfg.algorithm).use_vllm:
        from cai.backends.vllm_backend import require_vllm

        require_vllm(f"{cfg.algorithm}.use_vllm=true")
    if sharded_launch():
        raise CaiError(f"stage=rl under {sharded_launch()}: the PM that scores answers and PPO's frozen reference "
                       "are whole models on every process; launch stage=rl with pipelines/accelerate/ddp.yaml or "
                       "zero2.yaml")
    constitution, prompts, settings = _inputs(cfg)
    f = cfg.feedback
    # with source=ai, human labels (when given) are only compared with the AI labels
    human = _human_comparisons(cfg)
    if cfg.feedback.source == "human" and cfg.rounds > 1:
        raise CaiError(f"rounds={cfg.rounds} with feedback.source=human: imported labels do not change between "
                       "rounds; use rounds=1, or source=ai|mixed")
    if cfg.feedback.source == "mixed" and cfg.feedback.mixed_rule not in ("human_first", "by_category"):
        raise CaiError(f"feedback.mixed_rule={cfg.feedback.mixed_rule}: expected human_first or by_category")
    from cai.pipeline import run_dir_for, start_run

    run_dir = run_dir_for(cfg)
    sl_ref = _policy_ref(cfg, run_dir)
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
                if cfg.feedback.source == "human":  # RLHF: the imported human labels are the comparisons
                    comps = human
                    diag = {"pairs": len(human), "source": "human",
                            "annotators": len({c["annotator"] for c in human}),
                            "mean_margin": sum(abs(c["soft_label"] - 0.5) for c in human) / max(len(human), 1)}
                    counts = {"pairs": len(human), "answers_generated": 0, "answers_reused": 0,
                              "scores_computed": 0, "scores_reused": 0}
                else:
                    comps, diag, counts = sample_and_label(cfg, policy.path, prompts, constitution, settings, store,
                                                           rl_dir / "plans", f"round {r}", human)
                    if cfg.feedback.source == "mixed":
                        from cai.human import merge_sources

                        comps = merge_sources(comps, human, cfg.feedback.mixed_rule)
                        counts["human_used"] = sum(c["source"] == "human" for c in comps)
                write_jsonl_atomic(rdir / "comparisons.jsonl", comps)
                write_atomic(rdir / "label_diagnostics.json", json.dumps({**diag, **counts}, indent=1))
                print_diagnostics(f"round {r}/{cfg.rounds}: {cfg.feedback.source} labels", diag, counts)
                metrics.log({f"rl/labels/{k}": v for k, v in {**diag, **counts}.items() if v is not None}, step=r)
                write_jsonl_atomic(rl_dir / "comparisons.jsonl", all_comparisons + comps)
                return {**diag, **counts}

            labels = on_main(label_round)
            all_comparisons = read_jsonl(rl_dir / "comparisons.jsonl")  # every round's, on every process

            # the PM: trained from the SL-CAI model on every comparison so far (keyed: reused when unchanged)
            data = (rl_dir / "comparisons.jsonl").read_bytes()
            pm_key = pm_training_key(hashlib.sha256(data).hexdigest(), sl_ref, cfg.pm, cfg.seed)
            if trained_model_matches(rdir / "pm", pm_key):
                pm_summary = {**json.loads((rdir / "pm" / "cai_train.json").read_text()), "reused": True}
            else:
                pm_summary = train_pm(all_comparisons, sl_ref, cfg.pm, cfg.seed, rdir / "pm", rl_dir / "checkpoints",
                                      metrics, pm_key, device=cfg.policy.device, progress=cfg.progress)
            round_summary = {"round": r, "labels": labels, "pm": pm_summary}
            if cfg.algorithm != "none":
                pm_model, pm_tok = load_pm(rdir / "pm", device=cfg.policy.device)

                def score(ps, answers):
                    return score_answers(pm_model, pm_tok, ps, answers, batch_size=cfg.pm.batch_size * 2)

                texts = [p.prompt for p in prompts]
                if cfg.algorithm == "ppo":
                    rl_summary = _ppo_round(cfg, policy, sl_ref, pm_key, score, texts, rdir, run_dir, metrics)
                else:
                    from cai.config import stable_hash
                    from cai.online import train_group_rl

                    sub = cfg.rloo if cfg.algorithm == "rloo" else cfg.grpo
                    key = stable_hash([cfg.algorithm, policy.identity, pm_key, config_dict(sub), cfg.seed])
                    if trained_model_matches(rdir / "policy", key):
                        rl_summary = {**json.loads((rdir / "policy" / "cai_train.json").read_text()), "reused": True}
                    else:
                        card = f"# RL-CAI policy ({cfg.algorithm})\n\nFrom {policy.identity}, PM key {pm_key}.\n"
                        rl_summary = train_group_rl(cfg.algorithm, policy, score, texts, sub, cfg.seed, rdir, metrics,
                                                    key, card, device=cfg.policy.device, progress=cfg.progress)
                del pm_model
                round_summary["rl"] = rl_summary
                policy = resolve_model(str(rdir / "policy"))
            rounds.append(round_summary)
        if not is_main():
            return {"rounds": rounds}
        summary = {"run": str(run_dir), "algorithm": cfg.algorithm, "rounds": rounds,
                   "seconds": round(time.time() - started, 1)}
        write_atomic(rl_dir / "summary.json", json.dumps(summary, indent=1, default=str))
        print_rl_summary(summary)
        return summary


def _ppo_round(cfg, policy, sl_ref, pm_key: str, score, texts: list[str], rdir: Path, run_dir: Path, metrics) -> dict:
    """PPO keyed like every trained model: same inputs -> reuse rdir/policy; else train in rdir/ppo/<key>/
    (checkpoints there, so a killed run resumes only the same job) and swap the policy into place."""
    import shutil

    from cai.config import stable_hash
    from cai.models import resolve_model
    from cai.ppo import run_ppo
    from cai.training import TRAIN_INFO, swap_into_place, trained_model_matches

    ptx = _sft_examples(run_dir) if cfg.ppo.ptx_coef > 0 else None
    key = stable_hash(["ppo", policy.identity, sl_ref.identity, pm_key, config_dict(cfg.ppo), texts, ptx])
    if trained_model_matches(rdir / "policy", key):
        return {**json.loads((rdir / "policy" / TRAIN_INFO).read_text()), "reused": True}
    work = rdir / "ppo" / key
    summary = run_ppo(policy, score, texts, cfg.ppo, work, metrics,
                      value_init=resolve_model(str(rdir / "pm")) if cfg.ppo.value_init == "pm" else None,
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
        calibration = pm.get("heldout", {}).get("calibration") or []
        if calibration:
            print("    PM calibration (held out): " + "  ".join(
                f"[{b['lo']:.1f},{b['hi']:.1f}) n={b['count']} pred={b['mean_predicted']:.2f} label={b['mean_soft_label']:.2f}"
                for b in calibration))
        rl = r.get("rl")
        if rl:
            first = rl.get("first_reward_mean", rl.get("first_reward"))  # PPO's keys, then TRL's
            last = rl.get("last_reward_mean", rl.get("last_reward"))
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            print(f"    {summary['algorithm']}: {rl.get('steps')} steps, reward {fmt(first)} -> {fmt(last)}, "
                  f"KL {fmt(rl.get('last_kl'))}{' (reused)' if rl.get('reused') else ''}")
    print(f"run: {summary['run']}  total {summary['seconds']} s\n")


def run_dpo(cfg) -> dict:
    from cai.dpo import train_dpo

    constitution, prompts, settings = _inputs(cfg)
    from cai.pipeline import run_dir_for, start_run

    run_dir = run_dir_for(cfg)
    policy = _policy_ref(cfg, run_dir)
    with RunLock(run_dir):  # launched: the main process holds it for all (cai.launch)
        rl_dir = run_dir / "rl"
        rl_dir.mkdir(parents=True, exist_ok=True)
        metrics = start_run(run_dir, cfg, constitution)
        started = time.time()

        def label():  # launched: the main process only; the others read its comparisons.jsonl
            comps, diag, counts = sample_and_label(cfg, policy.path, prompts, constitution, settings,
                                                   JsonlStore(rl_dir / "steps.jsonl"), rl_dir / "plans", "dpo")
            write_jsonl_atomic(rl_dir / "dpo" / "comparisons.jsonl", comps)
            print_diagnostics("AI labels", diag, counts)
            return {**diag, **counts}

        labels = on_main(label)
        comps = read_jsonl(rl_dir / "dpo" / "comparisons.jsonl")
        card = f"# DPO policy\n\nFrom {policy.identity} on {len(comps)} AI-labeled pairs ({constitution.name}).\n"
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
