"""What stage=rl and stage=dpo share: their inputs, checked before any work, the starting policy, human labels,
and one round of sampling pairs from a policy and labeling them (AI feedback, cai.feedback)."""

from __future__ import annotations

import time
from pathlib import Path

from cai.backends import Sampling, backend_for, check_backend, release, sampling_from_config
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.feedback import LabelSettings, clear_pairs_as_pairs, label_diagnostics
from cai.human import (
    combine_human,
    load_human_comparisons,
    load_human_rankings,
    merge_sources,
    page_comparisons,
    page_gold,
)
from cai.io import read_jsonl
from cai.models import ModelRef, resolve_model
from cai.pair_sources import ContrastSettings, labeled_pairs_from_sources, load_contrast_context, read_chains
from cai.prompts import load_labeled_set, load_prompts
from cai.runs import run_dir_for
from cai.store import JsonlStore
from cai.templates import load_template


def policy_ref(cfg, run_dir: Path) -> ModelRef:
    """The starting policy: 'sl' = this run's SL-CAI model, else the model named."""
    if cfg.policy.model == "sl":
        sl_model = run_dir / "sl" / "model"
        if not (sl_model / "config.json").exists():
            raise CaiError(f"policy.model=sl: {sl_model} has no trained SL-CAI model; run stage=sl with "
                           f"run={cfg.run} first, or set policy.model to a model")
        return resolve_model(str(sl_model))
    return resolve_model(cfg.policy.model)


def ptx_data_path(cfg, run_dir: Path) -> Path:
    """PPO-ptx's SFT data: ppo.ptx_data, else the SL-CAI data of the run the policy comes from (this run's for
    policy.model=sl; <run>/sl/sft.jsonl for a policy at <run>/sl/model)."""
    if cfg.ppo.ptx_data:
        return Path(cfg.ppo.ptx_data)
    sl_dir = policy_sl_dir(cfg, run_dir)
    if sl_dir is not None:
        return sl_dir / "sft.jsonl"
    raise CaiError(f"ppo.ptx_coef={cfg.ppo.ptx_coef}: policy.model={cfg.policy.model} is not an SL-CAI model of a "
                   "run, so there is no SFT data to mix in; set ppo.ptx_data=FILE (an SFT JSONL)")


def ptx_examples(path: Path) -> list[dict]:
    """The SFT conversations for PPO-ptx (InstructGPT's pretraining-mix term); checked before any work."""
    if not path.exists():
        raise CaiError(f"ppo.ptx_coef > 0 mixes in SFT data, but {path} does not exist; run stage=sl first or set "
                       "ppo.ptx_data=FILE")
    rows = read_jsonl(path)
    for n, r in enumerate(rows, start=1):
        if not isinstance(r.get("prompt"), list) or not isinstance(r.get("completion"), list):
            raise CaiError(f"{path}:{n}: expected prompt and completion message lists (an SFT JSONL)")
    if not rows:
        raise CaiError(f"{path}: no SFT examples for ppo.ptx_coef > 0")
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def read_inputs(cfg):
    """Read and check every input before anything is written: (constitution, prompts, label settings, prompt
    sets), where prompt sets maps each prompt's text to the source it came from (red_team | helpful)."""
    constitution = load_constitution(cfg.constitution)
    red_team = load_prompts(cfg.red_team)
    helpful = load_prompts(cfg.helpful) if cfg.helpful_pairs else []
    prompt_sets = {**{p.prompt: "helpful" for p in helpful}, **{p.prompt: "red_team" for p in red_team}}
    prompts = red_team + helpful
    unique = {p.prompt: p for p in reversed(prompts)}  # the same text twice would give the same pair twice
    prompts = [p for p in prompts if unique[p.prompt] is p]
    if not prompts:
        raise CaiError("no prompts to sample pairs for (red_team and helpful are empty)")
    sampling_from_config(cfg.pair_sampling, "pair_sampling")
    f = cfg.feedback
    if f.source != "human":  # source=human samples and labels nothing
        check_backend(cfg.policy, "policy")
        for name, m in f.all_labelers():
            check_backend(m, name)
    settings = LabelSettings(
        seed=cfg.seed, principles_per_pair=f.principles_per_pair,
        conversation_template=load_template(f.conversation_template), template=load_template(f.template),
        cot=f.cot, cot_template=load_template(f.cot_template), cot_answer=load_template(f.cot_answer_template),
        cot_sampling=Sampling(max_new_tokens=f.cot_max_new_tokens, temperature=0.0),
        cot_clamp=(f.cot_clamp_low, f.cot_clamp_high),
        clear_pairs=clear_pairs_as_pairs(load_labeled_set(f.clear_pairs)) if f.labeler_accuracy() else None)
    if f.principles_per_pair > len(constitution.feedback):
        raise CaiError(f"feedback.principles_per_pair={f.principles_per_pair}: {cfg.constitution} has only "
                       f"{len(constitution.feedback)} feedback principles")
    return constitution, prompts, settings, prompt_sets


def human_comparisons(cfg) -> list[dict]:
    """Human labels: imported comparisons and rankings, then the run's labeling-page labels (`cai.label`);
    required for feedback.source=human|mixed."""
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


def pair_inputs(cfg, run_dir: Path, constitution) -> tuple[dict | None, ContrastSettings | None]:
    """What the weighted pair sources need, read and checked before any work: SL chains for `revision`, the
    contexts for `contrast`."""
    pc = cfg.pairs
    chains = None
    if pc.revision > 0:
        chains = read_chains(Path(pc.revision_chains) if pc.revision_chains else sl_dir_of(cfg, run_dir) / "chains.jsonl")
    contrast = None
    if pc.contrast > 0:
        contrast = ContrastSettings(
            contexts={"red_team": load_contrast_context(pc.contrast_harmless, pc.contrast_shots),
                      "helpful": load_contrast_context(pc.contrast_helpful, pc.contrast_shots)},
            labels=pc.contrast_labels, confidence=pc.contrast_confidence)
    return chains, contrast


def policy_sl_dir(cfg, run_dir: Path) -> Path | None:
    """The sl/ directory of the run the policy comes from: this run's for policy.model=sl, <run>/sl for a policy
    at <run>/sl/model; None for any other model."""
    if cfg.policy.model == "sl":
        return run_dir / "sl"
    model_dir = Path(cfg.policy.model)
    if model_dir.name == "model" and model_dir.parent.name == "sl":
        return model_dir.parent
    return None


def sl_dir_of(cfg, run_dir: Path) -> Path:
    """policy_sl_dir, for the revision source: an error where there is none."""
    sl_dir = policy_sl_dir(cfg, run_dir)
    if sl_dir is not None:
        return sl_dir
    raise CaiError(f"pairs.revision > 0: policy.model={cfg.policy.model} is not an SL-CAI model of a run, so there "
                   "are no SL chains to pair; set pairs.revision_chains=FILE")


def sample_and_label(cfg, policy_path: str, prompts, constitution, settings, store: JsonlStore, plan_dir: Path,
                     label: str, human: list[dict] | None = None, chains: dict | None = None,
                     contrast: ContrastSettings | None = None, prompt_sets: dict[str, str] | None = None) -> tuple[list[dict], dict, dict]:
    """Pairs from the weighted sources (cai.pair_sources), their labels, diagnostics: (comparisons, diagnostics,
    counts). Diagnostics of the AI labeler cover the pairs it labeled (construction labels have no order)."""
    sampling = sampling_from_config(cfg.pair_sampling, "pair_sampling")
    policy_backend = backend_for(cfg.policy, policy_path, progress=False)
    t0 = time.time()
    with store.tracking() as used:
        comparisons, by_source = labeled_pairs_from_sources(
            prompts, cfg.pairs.weights(), cfg.seed, prompt_sets=prompt_sets or {}, policy=policy_backend,
            labelers=[(name, lambda m=m: backend_for(m, progress=False), m.batch_size)
                      for name, m in cfg.feedback.all_labelers()],
            release_policy=lambda: release(policy_backend), sampling=sampling, constitution=constitution,
            label_settings=settings, store=store, plan_dir=plan_dir, batch_size=cfg.policy.batch_size,
            n=cfg.pairs.n, chains=chains, contrast=contrast, progress=cfg.progress, label=label,
            combine=cfg.feedback.combine, clear=settings.clear_pairs)
    seconds = time.time() - t0
    for c in comparisons:  # which prompt file each pair came from: the helpful/harmless split of mixed_rule
        c["prompt_set"] = (prompt_sets or {}).get(c["prompt"], c.get("prompt_set") or "red_team")
    labeled_by_ai = [c for c in comparisons if c.get("agree") is not None]
    diag = label_diagnostics(labeled_by_ai, human)
    diag["pairs"] = len(comparisons)
    if "consensus" in by_source:
        diag["consensus"] = by_source.pop("consensus")
    counts = {"pairs": len(comparisons), "answers_generated": by_source.pop("answers_generated"),
              "answers_reused": by_source.pop("answers_reused"), "scores_computed": by_source.pop("scores_computed"),
              "scores_reused": by_source.pop("scores_reused"), "seconds": round(seconds, 1),
              "seconds_per_label": by_source.pop("seconds_per_label"),
              "sources": {k: v for k, v in by_source.items() if v["prompts"]},
              "sampled_from": policy_backend.identity, "cost": data_cost(store, used)}
    return comparisons, diag, counts


def data_cost(store: JsonlStore, keys) -> dict:
    """What a round's pairs and labels cost to make, read from their stored records (so a resumed or reused
    round reports the same cost as the run that computed them): answers and the tokens generated for them, AI
    label calls (one forward pass per pair x principle x order) and their tokens of reasoning, and the seconds the
    records took when they were computed."""
    recs = [store.records[k] for k in keys if k in store.records]
    labels = [r for r in recs if "p_option_a" in r]
    answers = [r for r in recs if "p_option_a" not in r and "text" in r]
    return {"answers": len(answers), "tokens_generated": sum(r.get("completion_tokens", 0) for r in answers),
            "label_calls": len(labels), "label_tokens_generated": sum(r.get("completion_tokens", 0) for r in labels),
            "generation_seconds": round(sum(r.get("seconds", 0.0) for r in answers), 2),
            "label_seconds": round(sum(r.get("seconds", 0.0) for r in labels), 2)}


def round_cost(counts: dict, comps: list[dict], train_seconds: float = 0.0, train_tokens: int = 0) -> dict:
    """One round's cost for cai.compare: labels (AI pairs labeled, AI label calls, human labels used), tokens
    generated (pair answers, CoT reasoning, RL rollouts) and seconds (data + training)."""
    c = counts.get("cost") or {}
    tokens = c.get("tokens_generated", 0) + c.get("label_tokens_generated", 0) + train_tokens
    return {"ai_labels": sum(x.get("source") == "ai" for x in comps),
            "human_labels": sum(x.get("source") == "human" for x in comps),
            "label_calls": c.get("label_calls", 0), "tokens_generated": tokens,
            "data_seconds": round(c.get("generation_seconds", 0.0) + c.get("label_seconds", 0.0), 1),
            "train_seconds": round(train_seconds, 1),
            "seconds": round(c.get("generation_seconds", 0.0) + c.get("label_seconds", 0.0) + train_seconds, 1)}


def add_costs(costs: list[dict]) -> dict:
    """The sum of rounds' costs (every field is a count or seconds)."""
    out: dict = {}
    for c in costs:
        for k, v in c.items():
            out[k] = round(out.get(k, 0) + v, 1) if isinstance(v, float) else out.get(k, 0) + v
    return out


def round_comparisons(cfg, policy_path: str, prompts, constitution, settings, store: JsonlStore, plan_dir: Path,
                      label: str, human: list[dict], chains: dict | None, contrast: ContrastSettings | None,
                      prompt_sets: dict[str, str], already: list[dict] = ()) -> tuple[list[dict], dict, dict]:
    """One round's comparisons by feedback.source: human (the human labels are the comparisons; RLHF), ai (pairs
    from the sources, AI labels), or mixed (merged by mixed_rule). Comparisons already in `already` (an earlier
    round's) are not repeated: human labels enter once, in the first round that uses them. Several people's
    labels on one pair are combined by human.combine (cai.human.combine_human), with their agreement and each
    annotator's reliability and gold accuracy in the diagnostics."""
    human_report = None
    if human:
        human, human_report = combine_human(human, cfg.human.combine, page_gold(run_dir_for(cfg)))
    if cfg.feedback.source == "human":
        comps = human
        diag = {"pairs": len(human), "source": "human", "annotators": len(human_report["annotators"]),
                "mean_margin": sum(abs(c["soft_label"] - 0.5) for c in human) / max(len(human), 1)}
        counts = {"pairs": len(human), "answers_generated": 0, "answers_reused": 0, "scores_computed": 0,
                  "scores_reused": 0}
    else:
        comps, diag, counts = sample_and_label(cfg, policy_path, prompts, constitution, settings, store, plan_dir,
                                               label, human, chains, contrast, prompt_sets)
        if cfg.feedback.source == "mixed":
            comps = merge_sources(comps, human, cfg.feedback.mixed_rule)
    if human_report is not None:
        diag["human_consensus"] = human_report
    seen = {c["key"] for c in already}
    repeated = sum(c["key"] in seen for c in comps)
    comps = [c for c in comps if c["key"] not in seen]
    if cfg.feedback.source == "mixed":
        counts["human_used"] = sum(c["source"] == "human" for c in comps)
    if repeated:
        counts["already_in_earlier_rounds"] = repeated
    counts["pairs"] = len(comps)
    return comps, diag, counts


def clear_line(clear: dict) -> str:
    """A clear-pair check (cai.train.common.clear_pair_stats) in one line: accuracy against chance, per category
    and by which answer is longer (a check saved before `by_length` existed has none)."""
    splits = [*clear["by_category"].items(), *(clear.get("by_length") or {}).items()]
    return (f"accuracy {clear['accuracy']:.3f} (n={clear['count']}; chance 0.500)  " +
            "  ".join(f"{c.replace('_', ' ')} {v['accuracy']:.3f} (n={v['count']})" for c, v in splits))


def print_diagnostics(title: str, diag: dict, counts: dict) -> None:
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    print(f"\n{title}")
    h = diag.get("human_consensus")
    if h:
        print(f"  human labels: {h['labels']} on {h['pairs']} pairs ({h['pairs_with_several']} labeled by two or "
              f"more), combined: {h['combine']}")
        for name, r in h["annotators"].items():
            print(f"    {name}: {r['labels']} pairs, gold accuracy {fmt(r['gold_accuracy'])} (n={r['gold_count']}), "
                  f"reliability {fmt(r['reliability'])}, agreement with the combined label "
                  f"{fmt(r['agreement_with_consensus'])}")
        a = h.get("agreement")
        if a:
            print(f"    agreement: pairwise {fmt(a['pairwise_agreement']['mean'])}  Fleiss' kappa "
                  f"{fmt(a['fleiss_kappa'])}  Krippendorff's alpha nominal {fmt(a['alpha_nominal'])}")
    if diag.get("source") == "human":
        print(f"  {diag['pairs']} human comparisons from {diag['annotators']} annotator(s), "
              f"mean |p-0.5| {fmt(diag['mean_margin'])}")
        return
    print(f"  pairs {counts['pairs']} (answers generated {counts['answers_generated']}, reused "
          f"{counts['answers_reused']}); scores computed {counts['scores_computed']}, reused {counts['scores_reused']}")
    for name, c in (counts.get("sources") or {}).items():
        print(f"  source {name}: {c['prompts']} prompts, {c['pairs']} pairs")
    print(f"  position consistency {fmt(diag['position_consistency'])}  mean |p-0.5| {fmt(diag['mean_margin'])}  "
          f"near 0.5 {fmt(diag['share_near_half'])}  human agreement {fmt(diag['human_agreement'])} "
          f"(shared {diag['human_shared']})")
    cons = diag.get("consensus")
    if cons:
        print(f"  labelers combined by {cons['combine']}:")
        for d in cons["labelers"]:
            print(f"    {d['labeler']} ({d['identity']}): position consistency {fmt(d['position_consistency'])}  "
                  f"clear-pair accuracy {fmt(d['clear_accuracy'])} (n={d['clear_count']}; chance 0.5)  "
                  f"weight {fmt(d['weight'])}")
        a = cons.get("agreement")
        if a:
            print(f"    agreement on {a['units']} pairs: pairwise (hard choices) "
                  f"{fmt(a['pairwise_agreement']['mean'])}  Fleiss' kappa {fmt(a['fleiss_kappa'])} "
                  f"(n={a['fleiss_units']})  Krippendorff's alpha nominal {fmt(a['alpha_nominal'])}, "
                  f"interval (soft labels) {fmt(a['alpha_interval'])}")
