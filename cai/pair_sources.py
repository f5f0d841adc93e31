"""Where the answer pairs of stage=rl and stage=dpo come from (the `pairs.*` settings), and their labels.

Two samples of a small model are often nearly alike, and a labeler cannot prefer one of two near-identical
answers (at 135M: 75% of labels within 0.05 of 0.5). So pairs can come from sources with more contrast:

- `sample`: two samples of the policy per prompt (Bai et al. 2022, section 4.1), labeled by the AI labeler.
- `revision`: the SL stage's initial answer against the final revision of the same chain, labeled by the AI
  labeler (not assumed better: a 135M model's revision is often worse).
- `contrast`: RLCD (Yang et al. 2023, arXiv 2307.12950): the policy answers the prompt twice, once under a
  positive context and once under a negative one, each built from a system line with a critique/revision
  principle of the constitution, optional few-shot turns and an optional opener (the first words of the answer,
  which the model continues). Red-team and helpful prompts have their own contexts (`prompts/contrast/
  harmless.yaml`: decline vs comply; `prompts/contrast/helpful.yaml`: help vs refuse needlessly). Labeled by
  construction (the positive answer is better with probability `contrast_confidence`), or rescored by the AI
  labeler (RLCD-Rescore). At 135M a system line and few-shot turns barely move the model (refusals on red-team
  prompts 2% -> 15-20%, measured), so the shipped contexts also use openers.
- `best_of_n`: n samples per prompt; every pair of them is labeled (round robin) and the answers the labeler
  likes best and least form the pair, with their own label.

Each prompt is served by one source, drawn by weighted highest random weight on (seed, prompt, source): the
draw of a prompt does not move when other prompts change, and a weight change moves only the prompts whose
winner changes. Every answer and label is a keyed record in the stage's store (cai.waves), so reruns and resumes
reuse them, and editing one principle regenerates exactly the contrast answers that drew it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cai.backends import Backend, Sampling, release
from cai.constitution import Constitution
from cai.critique import choose_principle
from cai.errors import CaiError
from cai.feedback import (
    LabelSettings,
    clear_accuracy,
    consensus,
    consensus_weights,
    label_pairs,
    labelers_report,
    sample_answers,
    sample_pairs,
)
from cai.io import read_jsonl, read_yaml
from cai.paths import resolve_path
from cai.prompts import PromptRecord, check_examples
from cai.records import Comparison, Pair, stable_hash
from cai.store import JsonlStore
from cai.templates import Template
from cai.waves import Request, WaveStats, generation, generation_identity, run_wave

SOURCES = ("sample", "revision", "contrast", "best_of_n")
CONTRAST_FEW_SHOT_KEYS = ("prompt", "positive", "negative")


@dataclass
class ContrastSide:
    """One side of a contrast context: a system line (slot {{principle}}, optional) and openers (optional): the
    first words of the assistant's answer, one drawn per prompt, which the model then continues."""

    system: Template | None
    openers: list[str]
    max_new_tokens: int | None = None  # a cap on this side's continuation; 0: the answer is the opener alone


@dataclass
class ContrastContext:
    """The positive and negative context for one kind of prompt (red-team or helpful), from one YAML file."""

    name: str  # the file
    positive: ContrastSide
    negative: ContrastSide
    few_shot: list[dict]  # [{"prompt", "positive", "negative"}]: turns put before the real prompt

    @property
    def sha(self) -> str:
        side = lambda x: [x.system.text if x.system else None, x.openers, x.max_new_tokens]  # noqa: E731
        return stable_hash([side(self.positive), side(self.negative), self.few_shot])


@dataclass
class ContrastSettings:
    contexts: dict[str, ContrastContext]  # prompt set (red_team | helpful) -> its context
    labels: str  # construction | rescore
    confidence: float  # construction: P(positive answer is better)


def assign_sources(prompts: list[PromptRecord], weights: dict[str, float], seed: int,
                   eligible: dict[str, set[str]] | None = None) -> dict[str, list[PromptRecord]]:
    """source -> its prompts (in input order). Weighted highest random weight: each (prompt, source) gets
    u in (0, 1) from a hash and the source with the smallest -ln(u)/weight wins, so a source with weight w wins
    a share w/sum(weights) of the prompts. `eligible[source]`: the only prompt texts that source can serve (a
    prompt no weighted source can serve is left out)."""
    out: dict[str, list[PromptRecord]] = {s: [] for s in SOURCES}
    for p in prompts:
        best, best_score = None, math.inf
        for s in SOURCES:
            w = weights.get(s, 0.0)
            if w <= 0 or (eligible is not None and s in eligible and p.prompt not in eligible[s]):
                continue
            u = (int(stable_hash(["pair-source", seed, p.prompt, s], 13), 16) + 0.5) / 16 ** 13
            score = -math.log(u) / w
            if score < best_score:
                best, best_score = s, score
        if best is not None:
            out[best].append(p)
    return out


def _side(path: str, data, where: str) -> ContrastSide:
    if not isinstance(data, dict) or not set(data) <= {"system", "openers", "max_new_tokens"}:
        raise CaiError(f"{path}: {where}: expected a mapping with system, openers and/or max_new_tokens")
    system = data.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise CaiError(f"{path}: {where}.system: expected a non-empty string")
    tmpl = Template(f"{path}: {where}.system", system) if system else None
    if tmpl is not None and not tmpl.slots <= {"principle"}:
        raise CaiError(f"{path}: {where}.system: unknown slot(s) {sorted(tmpl.slots - {'principle'})}; the only "
                       "slot is {{principle}}")
    openers = data.get("openers", [])
    if not isinstance(openers, list) or not all(isinstance(o, str) and o.strip() for o in openers):
        raise CaiError(f"{path}: {where}.openers: expected a list of non-empty strings")
    cap = data.get("max_new_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise CaiError(f"{path}: {where}.max_new_tokens: expected a whole number >= 0, got {cap!r}")
    if cap == 0 and not openers:
        raise CaiError(f"{path}: {where}.max_new_tokens: 0 (the answer is the opener alone) needs openers")
    return ContrastSide(tmpl, openers, cap)


def load_contrast_context(path: str, shots: int) -> ContrastContext:
    """A contrast context file: positive/negative sides (system line, openers) and few-shot examples."""
    data = read_yaml(resolve_path(path), "contrast context", shown=str(path))
    if not isinstance(data, dict) or not {"positive", "negative"} <= set(data) or \
            not set(data) <= {"positive", "negative", "few_shot"}:
        raise CaiError(f"{path}: expected a mapping with positive, negative and optionally few_shot")
    few = data.get("few_shot") or []
    if not isinstance(few, list):
        raise CaiError(f"{path}: few_shot: expected a list of examples with {', '.join(CONTRAST_FEW_SHOT_KEYS)}")
    check_examples(path, few, CONTRAST_FEW_SHOT_KEYS, "few_shot")
    if shots > len(few):
        raise CaiError(f"{path}: pairs.contrast_shots={shots} but the file has only {len(few)} few-shot examples")
    ctx = ContrastContext(str(path), _side(path, data["positive"], "positive"),
                          _side(path, data["negative"], "negative"), few[:shots])
    for side in ("positive", "negative"):
        x = getattr(ctx, side)
        if x.system is None and not x.openers and not ctx.few_shot:
            raise CaiError(f"{path}: {side}: nothing sets this side apart (no system line, openers or few-shot)")
    return ctx


def read_chains(path: Path) -> dict[str, dict]:
    """SL chains by prompt text (cai.critique's chains.jsonl), for the revision source."""
    if not path.exists():
        raise CaiError(f"pairs.revision > 0 needs the SL stage's chains, but {path} does not exist; run stage=sl "
                       "first or set pairs.revision_chains=FILE")
    return {c["prompt"]: c for c in read_jsonl(path)}


# --- the sources ---------------------------------------------------------------------------------------------


def revision_pairs(prompts: list[PromptRecord], chains: dict[str, dict]) -> list[dict]:
    """Initial answer against the final revision of each prompt's chain (prompts without a usable chain are
    skipped). Which one is answer_a is drawn by a hash of the pair, so position carries no signal."""
    pairs = []
    for p in prompts:
        c = chains.get(p.prompt)
        if c is None or not c["rounds"]:
            continue
        initial, last = c["initial_answer"], c["rounds"][-1]
        revised = last["revision"]
        if not initial.strip() or not revised.strip() or initial == revised:
            continue
        keys = [c["answer_key"], last["revision_key"]]
        key = stable_hash(["revision-pair", *keys])
        a, b, ka, kb = (initial, revised, *keys) if int(key, 16) % 2 else (revised, initial, *keys[::-1])
        pairs.append(Pair(key=key, prompt_id=p.id, prompt=p.prompt, category=p.category, answer_a=a, answer_b=b,
                          model=c.get("model", ""), answer_keys=[ka, kb], source="revision").to_json())
    return pairs


def join_opener(opener: str, continuation: str) -> str:
    """The answer as the reader sees it: the opener the context put in the model's mouth, then the model's words."""
    if not opener:
        return continuation
    return opener + continuation if continuation[:1].isspace() or not continuation else f"{opener} {continuation}"


def side_sampling_of(sampling: Sampling, side: ContrastSide) -> Sampling:
    if side.max_new_tokens is None or side.max_new_tokens >= sampling.max_new_tokens:
        return sampling
    return dataclasses.replace(sampling, max_new_tokens=side.max_new_tokens)


def continuation(store: JsonlStore, request: Request) -> str:
    """What the model wrote after the opener ('' for a side whose answer is the opener alone)."""
    return "" if request.meta["max_new_tokens"] == 0 else store[request.key]["text"]


def generate_by_length(requests: list[Request], store: JsonlStore, backend: Backend, sampling: Sampling,
                       plan_dir: Path, batch_size: int, progress: bool, label: str) -> WaveStats:
    """One wave per answer length cap (a side may cap its continuation); returns the summed stats."""
    total = WaveStats()
    for cap in sorted({r.meta["max_new_tokens"] for r in requests} - {0}):  # 0: nothing to generate
        s = dataclasses.replace(sampling, max_new_tokens=cap)
        batch = [r for r in requests if r.meta["max_new_tokens"] == cap]
        stats, _ = run_wave(batch, store, generation(backend, s), plan_dir, batch_size,
                            label if cap == sampling.max_new_tokens else f"{label} ({cap} tokens)",
                            generation_identity(backend, s), progress)
        for k in ("generated", "reused", "prompt_tokens", "completion_tokens", "seconds"):
            setattr(total, k, getattr(total, k) + getattr(stats, k))
    return total


def contrast_requests(prompts: list[PromptRecord], prompt_sets: dict[str, str], constitution: Constitution,
                      s: ContrastSettings, model: str, sampling: Sampling, seed: int) -> list[tuple[Request, Request]]:
    """(positive, negative) answer requests per prompt, in the context of the prompt's set: a system line built
    from a critique/revision principle, few-shot turns, the prompt, and an opener the model continues."""
    out = []
    for p in prompts:
        ctx = s.contexts[prompt_sets.get(p.prompt, "red_team")]
        principle = choose_principle(seed, p.prompt, 0, constitution.critique_revision)
        pair = []
        for polarity in ("positive", "negative"):
            side: ContrastSide = getattr(ctx, polarity)
            conv = []
            if side.system is not None:
                values = {"principle": principle.revision} if side.system.slots else {}
                conv.append({"role": "system", "content": side.system.render(**values)})
            for ex in ctx.few_shot:
                conv += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex[polarity]}]
            conv.append({"role": "user", "content": p.prompt})
            opener = ""
            if side.openers:
                opener = side.openers[int(stable_hash(["opener", seed, p.prompt, polarity]), 16) % len(side.openers)]
                conv.append({"role": "assistant", "content": opener})
            uses_principle = side.system is not None and bool(side.system.slots)
            side_sampling = side_sampling_of(sampling, side)
            key = stable_hash({"kind": "contrast-answer", "polarity": polarity, "prompt": p.prompt,
                               "conversation": conv, "model": model, "sampling": side_sampling.as_dict(),
                               "seed": seed})
            pair.append(Request(key, f"contrast-{polarity}", conv, {
                "prompt_id": p.id, "opener": opener, "context": ctx.name, "max_new_tokens": side_sampling.max_new_tokens,
                "principle_id": principle.id if uses_principle else None}))
        out.append((pair[0], pair[1]))
    return out


def contrast_pairs(prompts: list[PromptRecord], prompt_sets: dict[str, str], constitution: Constitution,
                   s: ContrastSettings, backend: Backend, sampling: Sampling, seed: int, store: JsonlStore,
                   plan_dir: Path, batch_size: int, progress: bool = True,
                   label: str = "contrast") -> tuple[list[dict], WaveStats]:
    """Positive and negative answers of the policy; pairs whose answers differ. Each pair records which answer
    is the positive one (`positive_is_a`)."""
    reqs = contrast_requests(prompts, prompt_sets, constitution, s, backend.identity, sampling, seed)
    stats = generate_by_length([r for pair in reqs for r in pair], store, backend, sampling, plan_dir, batch_size,
                               progress, label)
    pairs = []
    for p, (pos, neg) in zip(prompts, reqs):
        tp = join_opener(pos.meta["opener"], continuation(store, pos))
        tn = join_opener(neg.meta["opener"], continuation(store, neg))
        if not tp.strip() or not tn.strip() or tp == tn:
            continue
        key = stable_hash(["contrast-pair", pos.key, neg.key])
        positive_is_a = int(key, 16) % 2 == 1
        a, b = (tp, tn) if positive_is_a else (tn, tp)
        ka, kb = (pos.key, neg.key) if positive_is_a else (neg.key, pos.key)
        rec = Pair(key=key, prompt_id=p.id, prompt=p.prompt, category=p.category, answer_a=a, answer_b=b,
                   model=backend.identity, answer_keys=[ka, kb], source="contrast",
                   prompt_set=prompt_sets.get(p.prompt, "red_team")).to_json()
        pairs.append({**rec, "positive_is_a": positive_is_a, "principle_id": pos.meta["principle_id"]})
    return pairs, stats


def construction_labels(pairs: list[dict], confidence: float) -> list[dict]:
    """RLCD's labels: the positive context's answer is better, with probability `confidence`."""
    out = []
    for pair in pairs:
        soft = confidence if pair["positive_is_a"] else 1 - confidence
        out.append(Comparison(
            key=stable_hash(["contrast-label", pair["key"], confidence]), pair_key=pair["key"],
            prompt_id=pair["prompt_id"], prompt=pair["prompt"], category=pair.get("category", ""),
            answer_a=pair["answer_a"], answer_b=pair["answer_b"], source="ai", annotator="construction",
            soft_label=soft, agree=None, extra={"pair_source": "contrast"}).to_json())
    return out


def best_of_n_candidates(prompts: list[PromptRecord], backend: Backend, sampling: Sampling, seed: int, n: int,
                         store: JsonlStore, plan_dir: Path, batch_size: int, progress: bool = True,
                         label: str = "best-of-n") -> tuple[list[dict], WaveStats]:
    """n samples per prompt (slots 0 and 1 are the `sample` source's answers, so they are shared) and every
    pair of distinct answers among them (round robin), each pair tagged with its prompt's group."""
    samples, stats = sample_answers(prompts, backend, sampling, seed, store, plan_dir, batch_size, n, progress,
                                    label)
    pairs = []
    for p, group in zip(prompts, samples):
        seen: dict[str, str] = {}
        for k, text in group:
            if text.strip() and text not in seen:
                seen[text] = k
        items = list(seen.items())
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (ta, ka), (tb, kb) = items[i], items[j]
                pairs.append(Pair(key=stable_hash([ka, kb]), prompt_id=p.id, prompt=p.prompt, category=p.category,
                                  answer_a=ta, answer_b=tb, model=backend.identity, answer_keys=[ka, kb],
                                  source="best_of_n").to_json())
    return pairs, stats


def best_of_n_extremes(comparisons: list[dict]) -> list[dict]:
    """Per prompt: each answer's mean P(better) over its round-robin pairs; the comparison between the best and
    the worst answer is kept (its own label, from the labeler)."""
    by_prompt: dict[str, list[dict]] = {}
    for c in comparisons:
        by_prompt.setdefault(c["prompt"], []).append(c)
    out = []
    for cs in by_prompt.values():
        wins: dict[str, list[float]] = {}
        for c in cs:
            wins.setdefault(c["answer_a"], []).append(c["soft_label"])
            wins.setdefault(c["answer_b"], []).append(1 - c["soft_label"])
        mean = {t: sum(v) / len(v) for t, v in wins.items()}
        best = max(sorted(mean), key=lambda t: mean[t])
        worst = min(sorted(mean), key=lambda t: mean[t])
        pick = next(c for c in cs if {c["answer_a"], c["answer_b"]} == {best, worst})
        out.append(pick)
    return out


def labeled_pairs_from_sources(prompts: list[PromptRecord], weights: dict[str, float], seed: int, *,
                               prompt_sets: dict[str, str],
                               policy: Backend, labelers: list[tuple[str, Callable[[], Backend], int]],
                               release_policy, sampling: Sampling,
                               constitution: Constitution, label_settings: LabelSettings, store: JsonlStore,
                               plan_dir: Path, batch_size: int, n: int = 4,
                               chains: dict[str, dict] | None = None, contrast: ContrastSettings | None = None,
                               progress: bool = True, label: str = "pairs", combine: str = "mean",
                               clear: list[dict] | None = None) -> tuple[list[dict], dict]:
    """Every source's pairs and their labels: (comparisons, counts per source). The policy generates first and
    is released (`release_policy`) before each labeler ((name, factory, batch size) in `labelers`) is loaded in
    turn. Several labelers: each labels every pair (and the `clear` pairs, for its accuracy), and the labels
    are combined by `combine` (cai.feedback.consensus); counts["consensus"] holds each labeler's diagnostics and
    their agreement."""
    eligible = {"revision": set(chains or {})}
    assigned = assign_sources(prompts, weights, seed, eligible)
    gen = WaveStats()
    to_label: list[dict] = []  # pairs the AI labeler labels
    labeled: list[dict] = []  # comparisons that need no labeler
    counts = {s: {"prompts": len(assigned[s]), "pairs": 0} for s in SOURCES}

    def add(stats: WaveStats) -> None:
        gen.generated += stats.generated
        gen.reused += stats.reused

    if assigned["sample"]:
        pairs, stats = sample_pairs(assigned["sample"], policy, sampling, seed, store, plan_dir, batch_size, progress,
                                    label=f"{label} sample")
        add(stats)
        pairs = [{**p, "source": "sample"} for p in pairs]
        to_label += pairs
        counts["sample"]["pairs"] = len(pairs)
    candidates: list[dict] = []
    if assigned["best_of_n"]:
        candidates, stats = best_of_n_candidates(assigned["best_of_n"], policy, sampling, seed, n, store, plan_dir,
                                                 batch_size, progress, label=f"{label} best-of-{n}")
        add(stats)
    contrast_p: list[dict] = []
    if assigned["contrast"]:
        if contrast is None:
            raise CaiError("pairs.contrast > 0 needs the contrast settings")
        contrast_p, stats = contrast_pairs(assigned["contrast"], prompt_sets, constitution, contrast, policy,
                                           sampling, seed, store, plan_dir, batch_size, progress,
                                           label=f"{label} contrast")
        add(stats)
        counts["contrast"]["pairs"] = len(contrast_p)
        if contrast.labels == "construction":
            labeled += construction_labels(contrast_p, contrast.confidence)
        else:
            to_label += contrast_p
    if assigned["revision"]:
        rp = revision_pairs(assigned["revision"], chains or {})
        to_label += rp
        counts["revision"]["pairs"] = len(rp)
    release_policy()

    label_stats = WaveStats()
    comparisons: list[dict] = []
    if to_label or candidates:
        per_labeler, clear_scores = [], []
        for name, factory, batch_size in labelers:
            labeler = factory()
            comps, stats = label_pairs(to_label + candidates + list(clear or []), constitution, label_settings,
                                       labeler, store, plan_dir, batch_size, progress)
            release(labeler)
            del labeler
            for k in ("generated", "reused", "seconds"):
                setattr(label_stats, k, getattr(label_stats, k) + getattr(stats, k))
            clear_keys = {p["key"] for p in clear or []}
            clear_scores.append(clear_accuracy([c for c in comps if c["pair_key"] in clear_keys], clear)
                                if clear else None)
            per_labeler.append((name, [c for c in comps if c["pair_key"] not in clear_keys]))
        weights = consensus_weights(clear_scores, combine)
        comparisons = consensus(per_labeler, weights, combine)
        if len(labelers) > 1 or clear:
            counts["consensus"] = {"combine": combine, **labelers_report(per_labeler, clear_scores, weights)}
    cand_keys = {p["key"] for p in candidates}
    bon = best_of_n_extremes([c for c in comparisons if c["pair_key"] in cand_keys])
    counts["best_of_n"]["pairs"] = len(bon)
    comparisons = [c for c in comparisons if c["pair_key"] not in cand_keys] + bon + labeled
    counts["answers_generated"], counts["answers_reused"] = gen.generated, gen.reused
    counts["scores_computed"], counts["scores_reused"] = label_stats.generated, label_stats.reused
    counts["seconds_per_label"] = round(label_stats.seconds / max(label_stats.generated, 1), 4)
    return comparisons, counts
