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
