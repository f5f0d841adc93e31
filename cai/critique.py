"""SL-CAI data: an initial answer per red-team prompt, then R rounds of critique -> revision.

Bai et al. 2022, "Constitutional AI", section 3.1. Each round samples one critique/revision principle; few-shot
demonstrations are prepended as earlier chat turns; every round is kept.

Every generated text is a step record in `sl/steps.jsonl`, keyed by a hash of everything that determines it:
the prompt or parent step, the principle text, the template and few-shot text, the model identity, sampling
parameters, seed and round. Editing one principle changes the keys of exactly the rounds that used it and
of every later round of those chains (their parent changed); everything else is found in the store.

Work runs in waves (all initial answers, then round 1's critiques, round 1's revisions, ...). Before a wave
starts, its batches are fixed in a plan file. Batch composition changes the floating-point result of a
batched forward pass (bf16 especially), so a resumed run replays the same batches and produces exactly the
records an uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cai.backends import Backend, Message, Sampling
from cai.constitution import Constitution, CritiqueRevision, principle_sha
from cai.prompts import PromptRecord
from cai.records import sft_example, stable_hash
from cai.store import JsonlStore
from cai.templates import Template
from cai.waves import Request, WaveStats, generation, generation_identity, run_wave


def choose_principle(seed: int, prompt: str, round_: int, principles: tuple[CritiqueRevision, ...]) -> CritiqueRevision:
    """Seeded choice by highest random weight: every principle id gets a hash score, the top one wins.

    Unlike `rng.choice(list)`, this choice does not move when a principle's text is edited, and adding or
    removing a principle changes only the rounds where that principle wins or won.
    """
    return max(principles, key=lambda p: stable_hash([seed, prompt, round_, p.id]))


@dataclass
class ChainSettings:
    seed: int
    rounds: int
    critique_template: Template
    revision_template: Template
    few_shot: list[dict]
    sampling: Sampling
    model_identity: str

    @property
    def few_shot_sha(self) -> str:
        return stable_hash(self.few_shot, 16)


def answer_request(p: PromptRecord, s: ChainSettings, kind: str = "answer") -> Request:
    key = stable_hash({"kind": "answer", "prompt": p.prompt, "model": s.model_identity,
                       "sampling": s.sampling.as_dict(), "seed": s.seed})
    return Request(key, kind, [{"role": "user", "content": p.prompt}], {"prompt_id": p.id})


def critique_request(p: PromptRecord, answer: str, parent: str, principle: CritiqueRevision, round_: int,
                     s: ChainSettings) -> Request:
    conv: list[Message] = []
    for demo in s.few_shot:
        conv += [{"role": "user", "content": s.critique_template.render(
                     prompt=demo["prompt"], answer=demo["answer"], critique_request=demo["critique_request"])},
                 {"role": "assistant", "content": demo["critique"]}]
    conv.append({"role": "user", "content": s.critique_template.render(
        prompt=p.prompt, answer=answer, critique_request=principle.critique)})
    key = stable_hash({"kind": "critique", "parent": parent, "request": principle.critique,
                       "template": s.critique_template.sha, "few_shot": s.few_shot_sha, "model": s.model_identity,
                       "sampling": s.sampling.as_dict(), "seed": s.seed, "round": round_})
    return Request(key, "critique", conv, {"prompt_id": p.id, "round": round_, "principle_id": principle.id})


def revision_request(p: PromptRecord, answer: str, critique: str, parent: str, principle: CritiqueRevision,
                     round_: int, s: ChainSettings) -> Request:
    conv: list[Message] = []
    for demo in s.few_shot:
        conv += [{"role": "user", "content": s.revision_template.render(
                     prompt=demo["prompt"], answer=demo["answer"], critique_request=demo["critique_request"],
                     critique=demo["critique"], revision_request=demo["revision_request"])},
                 {"role": "assistant", "content": demo["revision"]}]
    conv.append({"role": "user", "content": s.revision_template.render(
        prompt=p.prompt, answer=answer, critique_request=principle.critique, critique=critique,
        revision_request=principle.revision)})
    key = stable_hash({"kind": "revision", "parent": parent, "request": principle.revision,
                       "template": s.revision_template.sha, "few_shot": s.few_shot_sha, "model": s.model_identity,
                       "sampling": s.sampling.as_dict(), "seed": s.seed, "round": round_})
    return Request(key, "revision", conv, {"prompt_id": p.id, "round": round_, "principle_id": principle.id})


@dataclass
class GenerationResult:
    chains: list[dict]
    helpful: list[dict]  # {"prompt_id", "prompt", "answer", "key"}
    waves: dict[str, WaveStats]
    chains_reused: int
    chains_regenerated: int
    rounds_reused: int
    rounds_regenerated: int


def generate_chains(red_team: list[PromptRecord], helpful: list[PromptRecord], constitution: Constitution,
                    s: ChainSettings, backend: Backend, store: JsonlStore, plan_dir: Path, batch_size: int,
                    progress: bool = True) -> GenerationResult:
    waves: dict[str, WaveStats] = {}
    fresh: set[str] = set()

    def wave(requests, label):
        stats, gen = run_wave(requests, store, generation(backend, s.sampling), plan_dir, batch_size, label,
                              generation_identity(backend, s.sampling), progress)
        waves[label] = stats
        fresh.update(gen)

    answers = [answer_request(p, s) for p in red_team]
    helpful_reqs = [answer_request(p, s, kind="helpful") for p in helpful]
    wave(answers + [r for r in helpful_reqs if r.key not in {a.key for a in answers}], "answers")

    # state per chain: the current answer text and the key of the step that produced it
    current = [(store[a.key]["text"], a.key) for a in answers]
    rounds: list[list[dict]] = [[] for _ in red_team]
    for r in range(1, s.rounds + 1):
        principles = [choose_principle(s.seed, p.prompt, r, constitution.critique_revision) for p in red_team]
        crit = [critique_request(p, ans, parent, pr, r, s)
                for p, (ans, parent), pr in zip(red_team, current, principles)]
        wave(crit, f"round {r}/{s.rounds} critique")
        revs = [revision_request(p, ans, store[c.key]["text"], c.key, pr, r, s)
                for p, (ans, _), c, pr in zip(red_team, current, crit, principles)]
        wave(revs, f"round {r}/{s.rounds} revision")
        for i, (pr, c, v) in enumerate(zip(principles, crit, revs)):
            rounds[i].append({"round": r, "principle_id": pr.id, "critique_request_sha": principle_sha(pr.critique),
                              "revision_request_sha": principle_sha(pr.revision), "critique": store[c.key]["text"],
                              "revision": store[v.key]["text"], "critique_key": c.key, "revision_key": v.key})
            current[i] = (store[v.key]["text"], v.key)

    chains = []
    for p, a, rs in zip(red_team, answers, rounds):
        steps = [store[a.key]] + [store[k] for x in rs for k in (x["critique_key"], x["revision_key"])]
        chains.append({
            "key": stable_hash([a.key] + [x["revision_key"] for x in rs]),
            "prompt_id": p.id, "prompt": p.prompt, "category": p.category,
            "initial_answer": store[a.key]["text"], "answer_key": a.key, "rounds": rs,
            "model": s.model_identity, "seed": s.seed, "sampling": s.sampling.as_dict(),
            "templates": {"critique": s.critique_template.sha, "revision": s.revision_template.sha},
            "few_shot": {"count": len(s.few_shot), "sha": s.few_shot_sha},
            "constitution": {"name": constitution.name, "sha": constitution.sha},
            "prompt_tokens": sum(x["prompt_tokens"] for x in steps),
            "completion_tokens": sum(x["completion_tokens"] for x in steps),
            "seconds": round(sum(x["seconds"] for x in steps), 3),
        })
    helpful_out = [{"key": r.key, "prompt_id": p.id, "prompt": p.prompt, "answer": store[r.key]["text"]}
                   for p, r in zip(helpful, helpful_reqs)]
    # what this invocation generated (not stored in the records: those must not depend on interruptions)
    round_regen = [[x["critique_key"] in fresh or x["revision_key"] in fresh for x in c["rounds"]] for c in chains]
    regenerated = [c for c, a, rr in zip(chains, answers, round_regen) if a.key in fresh or any(rr)]
    n_rounds_regen = sum(map(sum, round_regen))
    return GenerationResult(chains, helpful_out, waves, len(chains) - len(regenerated), len(regenerated),
                            len(chains) * s.rounds - n_rounds_regen, n_rounds_regen)


def sft_examples(chains: list[dict], helpful: list[dict], data: str, initial: bool = False) -> list[dict]:
    """Prompt -> revision conversations (data: final revision, every round's, or none), plus helpful answers, plus
    (initial=True, for C-RLFT's lower-reward source) each revised chain's initial answer.

    Conversational prompt/completion records: TRL's SFTTrainer computes the loss on the completion only.
    Empty texts are dropped (a tiny model sometimes ends at once).
    """
    out = []
    for c in chains if data in ("final", "all") else []:  # data="none": helpful answers only
        picked = c["rounds"][-1:] if data == "final" else c["rounds"]
        if not c["rounds"]:  # rounds=0: the initial answers themselves
            picked = [{"round": 0, "revision": c["initial_answer"], "revision_key": c["answer_key"]}]
        for x in picked:
            if x["revision"].strip():
                out.append(sft_example(x["revision_key"], "revision", c["prompt_id"], x["round"], c["prompt"],
                                       x["revision"]))
    for c in chains if initial else []:
        if c["rounds"] and c["initial_answer"].strip():  # rounds=0: the initial answer is the revision already
            out.append(sft_example(c["answer_key"], "initial", c["prompt_id"], 0, c["prompt"], c["initial_answer"]))
    for h in helpful:
        if h["answer"].strip():
            out.append(sft_example(h["key"], "helpful", h["prompt_id"], 0, h["prompt"], h["answer"]))
    return out
