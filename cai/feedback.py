"""AI feedback: sample answer pairs, then label each pair by the feedback model's option log-probabilities.

Bai et al. 2022 ("Constitutional AI", section 4.1) with the position debiasing of Lee et al. 2023 ("RLAIF"):
for every pair, K feedback principles are sampled (seeded); for each principle the multiple-choice prompt is
scored in both orders (answers swapped), and the probabilities of the option letters, normalized over the
options, are averaged into one soft label P(answer A is better). The prompt ends just before the option letter,
so both letters are scored by one forward pass. In chain-of-thought mode the labeler first writes its
reasoning, then the letters are scored, and each probability is clamped to [0.4, 0.6] as the paper does
(CoT answers are over-confident).

Every score is a keyed record (pair, principle text, order, template, labeler, settings), so editing one
feedback principle relabels exactly the pairs that used it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cai.agreement import accuracy_weight, agreement_report, weighted_mean
from cai.backends import Backend, Sampling
from cai.constitution import Constitution, FeedbackPrinciple, principle_sha
from cai.errors import CaiError
from cai.losses import cot_clamp, debiased_soft_label, preference_probs_from_option_logprobs
from cai.prompts import PromptRecord
from cai.records import Comparison, Pair, pair_identity, stable_hash
from cai.store import JsonlStore
from cai.templates import Template
from cai.waves import Request, WaveStats, generation, generation_identity, run_wave

OPTIONS = ("A", "B")


# --- pairs -----------------------------------------------------------------------------------------------


def sample_answers(prompts: list[PromptRecord], backend: Backend, sampling: Sampling, seed: int, store: JsonlStore,
                   plan_dir: Path, batch_size: int, slots: int, progress: bool = True,
                   label: str = "answers") -> tuple[list[list[tuple[str, str]]], WaveStats]:
    """`slots` sampled answers per prompt from one model (different per-answer seeds via the key): per prompt, a
    list of (key, text). Slot i's key does not depend on `slots`, so sources that sample more reuse the rest."""
    reqs = []
    for p in prompts:
        for slot in range(slots):
            key = stable_hash({"kind": "pair-answer", "prompt": p.prompt, "model": backend.identity,
                               "sampling": sampling.as_dict(), "seed": seed, "slot": slot})
            reqs.append(Request(key, "pair-answer", [{"role": "user", "content": p.prompt}], {"prompt_id": p.id}))
    stats, _ = run_wave(reqs, store, generation(backend, sampling), plan_dir, batch_size, label,
                        generation_identity(backend, sampling), progress)
    groups = [[(r.key, store[r.key]["text"]) for r in reqs[slots * i:slots * (i + 1)]] for i in range(len(prompts))]
    return groups, stats


def sample_pairs(prompts: list[PromptRecord], backend: Backend, sampling: Sampling, seed: int, store: JsonlStore,
                 plan_dir: Path, batch_size: int, progress: bool = True, label: str = "pairs") -> tuple[list[dict], WaveStats]:
    """Two sampled answers per prompt from the same model (different per-answer seeds via the key)."""
    groups, stats = sample_answers(prompts, backend, sampling, seed, store, plan_dir, batch_size, 2, progress, label)
    pairs = []
    for p, ((ka, ta), (kb, tb)) in zip(prompts, groups):
        pairs.append(Pair(key=stable_hash([ka, kb]), prompt_id=p.id, prompt=p.prompt, category=p.category,
                          answer_a=ta, answer_b=tb, model=backend.identity, answer_keys=[ka, kb]).to_json())
    return pairs, stats


# --- labeling --------------------------------------------------------------------------------------------


@dataclass
class LabelSettings:
    seed: int
    principles_per_pair: int  # K
    conversation_template: Template  # renders the conversation slot from the human prompt
    template: Template  # multiple-choice prompt, last line = the start of the labeler's answer, ending before the letter
    cot: bool = False
    cot_template: Template | None = None  # last line = start of the labeler's reasoning ("Let's think step by step:")
    cot_answer: Template | None = None  # appended after the reasoning; ends just before the letter
    cot_sampling: Sampling = Sampling(max_new_tokens=128, temperature=0.0)
    cot_clamp: tuple[float, float] = (0.4, 0.6)
    clear_pairs: list[dict] | None = None  # several labelers: pairs with a known answer each also labels (accuracy)


def choose_feedback_principles(seed: int, pair_key: str, principles: tuple[FeedbackPrinciple, ...], k: int):
    """K distinct principles by highest random weight (stable under text edits; see critique.choose_principle)."""
    if k > len(principles):
        raise CaiError(f"feedback.principles_per_pair={k} but the constitution has only {len(principles)} feedback principles")
    return sorted(principles, key=lambda p: stable_hash([seed, pair_key, p.id]), reverse=True)[:k]


def split_answer_prefix(rendered: str, template_name: str) -> tuple[str, str]:
    """A feedback template's last line starts the labeler's own turn: (user message, assistant prefix)."""
    head, sep, last = rendered.rpartition("\n")
    if not sep or not last.strip():
        raise CaiError(f"{template_name}: the last line must start the labeler's answer (e.g. 'The answer is: (')")
    return head.rstrip("\n"), last


def _mc_messages(s: LabelSettings, template: Template, pair: dict, principle: FeedbackPrinciple, swapped: bool):
    first, second = (pair["answer_b"], pair["answer_a"]) if swapped else (pair["answer_a"], pair["answer_b"])
    text = template.render(conversation=s.conversation_template.render(prompt=pair["prompt"]),
                           question=principle.question, answer_a=first, answer_b=second)
    user, prefix = split_answer_prefix(text, template.name)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": prefix}]


def label_requests(pairs: list[dict], constitution: Constitution, s: LabelSettings, labeler: str) -> list[Request]:
    """One request per (pair, principle, order)."""
    template = s.cot_template if s.cot else s.template
    reqs = []
    for pair in pairs:
        for pr in choose_feedback_principles(s.seed, pair["key"], constitution.feedback, s.principles_per_pair):
            for swapped in (False, True):
                key = stable_hash({"kind": "label", "pair": pair["key"], "question": pr.question,
                                   "template": template.sha, "conversation": s.conversation_template.sha,
                                   "labeler": labeler, "swapped": swapped, "cot": s.cot, "seed": s.seed,
                                   "cot_answer": s.cot_answer.sha if s.cot else None,
                                   "cot_sampling": s.cot_sampling.as_dict() if s.cot else None})
                reqs.append(Request(key, "label", _mc_messages(s, template, pair, pr, swapped),
                                    {"pair_key": pair["key"], "principle_id": pr.id, "swapped": swapped}))
    return reqs


def scoring(backend: Backend, s: LabelSettings):
    """A `compute` for run_wave: P(option A) for each request (after reasoning first, in CoT mode)."""

    def compute(batch: list[Request]) -> list[dict]:
        convs = [r.conversation for r in batch]
        reasoning = [None] * len(batch)
        if s.cot:
            outs = backend.generate(convs, s.cot_sampling, [r.seed for r in batch])
            reasoning = [o.text for o in outs]
            convs = [c[:-1] + [{"role": "assistant", "content": c[-1]["content"] + text + s.cot_answer.render()}]
                     for c, text in zip(convs, reasoning)]
        logps = backend.option_logprobs([backend.chat_prompt(c) for c in convs], list(OPTIONS))
        return [{"logp": lp, "p_option_a": preference_probs_from_option_logprobs(lp[0], lp[1]), "reasoning": why}
                for lp, why in zip(logps, reasoning)]

    return compute


def label_pairs(pairs: list[dict], constitution: Constitution, s: LabelSettings, backend: Backend,
                store: JsonlStore, plan_dir: Path, batch_size: int, progress: bool = True) -> tuple[list[dict], WaveStats]:
    """Label every pair; returns comparison records (the same shape human labels take) and wave stats."""
    reqs = label_requests(pairs, constitution, s, backend.identity)
    ident = stable_hash([backend.identity, s.cot, s.cot_sampling.as_dict()])
    # batches by pair length, a pair's requests side by side (one order after the other): with the shared-prefix
    # template a pair's K principles in one order share all but the question, and the backend runs it once
    size = {p["key"]: len(p["prompt"]) + len(p["answer_a"]) + len(p["answer_b"]) for p in pairs}
    stats, _ = run_wave(reqs, store, scoring(backend, s), plan_dir, batch_size, "labels", ident, progress, unit="prompt",
                        bucket=lambda r: (size[r.meta["pair_key"]], r.meta["pair_key"], r.meta["swapped"]))
    by_pair: dict[str, list[Request]] = {}
    for r in reqs:
        by_pair.setdefault(r.meta["pair_key"], []).append(r)
    lo, hi = s.cot_clamp
    comparisons = []
    for pair in pairs:
        per_principle = []
        for first, swapped in zip(by_pair[pair["key"]][0::2], by_pair[pair["key"]][1::2]):
            p_ab, p_ba = store[first.key]["p_option_a"], store[swapped.key]["p_option_a"]
            if s.cot:  # clamp each order's probability, then debias
                p_ab, p_ba = cot_clamp(p_ab, lo, hi), cot_clamp(p_ba, lo, hi)
            pr = next(p for p in constitution.feedback if p.id == first.meta["principle_id"])
            per_principle.append({"id": pr.id, "question_sha": principle_sha(pr.question), "p_a_first": p_ab,
                                  "p_a_swapped": p_ba, "label": debiased_soft_label(p_ab, p_ba),
                                  "reasoning": [store[first.key]["reasoning"], store[swapped.key]["reasoning"]]
                                  if s.cot else None})
        n = len(per_principle)
        first_order = sum(x["p_a_first"] for x in per_principle) / n  # P(answer A) when shown first
        second_order = sum(1 - x["p_a_swapped"] for x in per_principle) / n  # P(answer A) when shown second
        soft = sum(x["label"] for x in per_principle) / n
        comparisons.append(Comparison(
            key=stable_hash([pair["key"]] + [r.key for r in by_pair[pair["key"]]]), pair_key=pair["key"],
            prompt_id=pair["prompt_id"], prompt=pair["prompt"], category=pair.get("category", ""),
            answer_a=pair["answer_a"], answer_b=pair["answer_b"], source="ai", annotator=backend.identity,
            soft_label=soft, agree=(first_order > 0.5) == (second_order > 0.5), principles=per_principle,
            cot=s.cot, extra={"pair_source": pair.get("source", "sample")}).to_json())
    return comparisons, stats


# --- several labelers: clear-pair accuracy and consensus --------------------------------------------------


def clear_pairs_as_pairs(rows: list[dict]) -> list[dict]:
    """Clear pairs (cai.prompts.load_labeled_set rows) as pairs to label; which answer is A is drawn by a hash of
    the pair (so a labeler's position bias cannot pass for accuracy). Each carries `better_is_a`."""
    out = []
    for r in rows:
        key = stable_hash(["clear-pair", r["prompt"], r["better"], r["worse"]])
        better_is_a = int(key, 16) % 2 == 1
        a, b = (r["better"], r["worse"]) if better_is_a else (r["worse"], r["better"])
        out.append({**Pair(key=key, prompt_id=r["id"], prompt=r["prompt"], category=r["category"], answer_a=a,
                           answer_b=b, model="clear-pairs", answer_keys=[], source="clear").to_json(),
                    "better_is_a": better_is_a})
    return out


def clear_accuracy(comparisons: list[dict], clear: list[dict]) -> dict:
    """Share of clear pairs where the label prefers the better answer (a tie at exactly 0.5 counts half), overall
    and by category; `correct` is the (fractional) count behind it, for `accuracy_weight`."""
    by_key = {p["key"]: p for p in clear}
    scored = [(by_key[c["pair_key"]], c["soft_label"]) for c in comparisons if c["pair_key"] in by_key]

    def acc(items):
        right = sum(0.5 if p == 0.5 else float((p > 0.5) == pair["better_is_a"]) for pair, p in items)
        return {"accuracy": right / len(items) if items else None, "count": len(items), "correct": right}

    cats = sorted({pair["category"] for pair, _ in scored})
    return {**acc(scored), "by_category": {c: acc([x for x in scored if x[0]["category"] == c]) for c in cats}}


def labeler_diagnostics(name: str, comparisons: list[dict], clear: dict | None, weight: float | None) -> dict:
    n = len(comparisons)
    return {"labeler": name, "identity": comparisons[0]["annotator"] if comparisons else None, "pairs": n,
            "position_consistency": sum(bool(c["agree"]) for c in comparisons) / n if n else None,
            "mean_margin": sum(abs(c["soft_label"] - 0.5) for c in comparisons) / n if n else None,
            "clear_accuracy": clear["accuracy"] if clear else None, "clear_count": clear["count"] if clear else 0,
            "weight": weight}


def consensus(per_labeler: list[tuple[str, list[dict]]], weights: list[float], method: str) -> list[dict]:
    """One comparison per pair from several labelers' comparisons of the same pairs (same order): the soft label
    is the mean (method=mean) or the weighted mean (accuracy_weighted) of theirs. Each labeler's label is kept in
    `labelers`; `principles` holds every labeler's principle scores (tagged with the labeler), so position
    consistency is that of the combined first-order and second-order probabilities. One labeler: its own
    comparisons, unchanged (the same keys as a single-labeler run)."""
    if len(per_labeler) == 1:
        return per_labeler[0][1]
    w = weights if method == "accuracy_weighted" else [1.0] * len(per_labeler)
    by_pair = [{c["pair_key"]: c for c in comps} for _, comps in per_labeler]
    out = []
    for base in per_labeler[0][1]:
        cs = [m[base["pair_key"]] for m in by_pair]
        principles = [{**x, "labeler": name} for (name, _), c in zip(per_labeler, cs) for x in c["principles"]]
        n = len(principles)
        first = sum(x["p_a_first"] for x in principles) / n
        second = sum(1 - x["p_a_swapped"] for x in principles) / n
        labels = [{"labeler": name, "identity": c["annotator"], "soft_label": c["soft_label"], "agree": c["agree"],
                   "weight": wi} for (name, _), c, wi in zip(per_labeler, cs, w)]
        extra = {k: v for k, v in base.items() if k not in Comparison.__dataclass_fields__}
        out.append(Comparison(
            key=stable_hash(["consensus", method, [c["key"] for c in cs], [round(x, 12) for x in w]]),
            pair_key=base["pair_key"], prompt_id=base["prompt_id"], prompt=base["prompt"],
            category=base["category"], answer_a=base["answer_a"], answer_b=base["answer_b"], source="ai",
            annotator="consensus", soft_label=weighted_mean([c["soft_label"] for c in cs], w),
            agree=(first > 0.5) == (second > 0.5), principles=principles, cot=base["cot"],
            extra={**extra, "labelers": labels, "combine": method}).to_json())
    return out


def consensus_weights(clear: list[dict | None], method: str) -> list[float]:
    """Each labeler's weight: 1 for mean; for accuracy_weighted, `accuracy_weight` of its clear-pair score."""
    if method != "accuracy_weighted":
        return [1.0] * len(clear)
    return [accuracy_weight(c["correct"], c["count"]) if c and c["count"] else 0.0 for c in clear]


def labelers_report(per_labeler: list[tuple[str, list[dict]]], clear: list[dict | None],
                    weights: list[float]) -> dict:
    """Each labeler's diagnostics and the agreement between them on the pairs they all labeled (soft labels as
    units x labelers; cai.agreement)."""
    names = [n for n, _ in per_labeler]
    maps = [{c["pair_key"]: c["soft_label"] for c in comps} for _, comps in per_labeler]
    keys = [c["pair_key"] for c in per_labeler[0][1]] if per_labeler else []
    rows = [[m.get(k) for m in maps] for k in keys]
    return {"labelers": [labeler_diagnostics(n, comps, cl, w) for (n, comps), cl, w in zip(per_labeler, clear, weights)],
            "agreement": agreement_report(rows, names) if len(names) > 1 else None}


# --- diagnostics ------------------------------------------------------------------------------------------


def label_diagnostics(comparisons: list[dict], human: list[dict] | None = None, near: float = 0.05) -> dict:
    """Position consistency, confidence, and agreement with human labels on shared pairs.

    - position_consistency: share of pairs whose preferred answer survives swapping the order;
    - mean_margin: mean |p - 0.5|; share_near_half: share with |p - 0.5| < near;
    - human_agreement: share of shared pairs (human label not exactly 0.5) where AI and human prefer the same.
    """
    n = len(comparisons)
    out = {"pairs": n,
           "position_consistency": sum(c["agree"] for c in comparisons) / n if n else None,
           "mean_margin": sum(abs(c["soft_label"] - 0.5) for c in comparisons) / n if n else None,
           "share_near_half": sum(abs(c["soft_label"] - 0.5) < near for c in comparisons) / n if n else None,
           "human_shared": 0, "human_agreement": None}
    if human:
        ai = {pair_identity(c): c for c in comparisons}
        agree = total = 0
        for h in human:
            c = ai.get(pair_identity(h))
            if c is None or h["soft_label"] == 0.5:
                continue
            h_prefers_a = (h["soft_label"] > 0.5) == (h["answer_a"] == c["answer_a"])  # in the AI record's order
            total += 1
            agree += (c["soft_label"] > 0.5) == h_prefers_a
        out["human_shared"] = total
        out["human_agreement"] = agree / total if total else None
    return out
