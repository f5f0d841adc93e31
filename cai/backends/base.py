"""The types every backend shares: messages, sampling parameters, completions, and the Backend protocol."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

from cai.errors import CaiError

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; part of every generated record's key."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    stop: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def sampling_from_config(section, name: str) -> Sampling:
    """A Sampling from a config section (max_new_tokens, temperature, top_p, top_k), checked, errors naming the key."""
    problems = []
    if section.max_new_tokens < 1:
        problems.append(f"{name}.max_new_tokens={section.max_new_tokens}: expected >= 1")
    if section.temperature < 0:
        problems.append(f"{name}.temperature={section.temperature}: expected >= 0 (0 = greedy)")
    if not 0 < section.top_p <= 1:
        problems.append(f"{name}.top_p={section.top_p}: expected 0 < top_p <= 1")
    if section.top_k < 0:
        problems.append(f"{name}.top_k={section.top_k}: expected >= 0 (0 = off)")
    if problems:
        raise CaiError("; ".join(problems))
    return Sampling(max_new_tokens=section.max_new_tokens, temperature=section.temperature, top_p=section.top_p,
                    top_k=section.top_k)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"


class Backend(Protocol):
    identity: str  # model identity: part of every record key

    def chat_prompt(self, conversation: list[Message]) -> str: ...

    def generate(self, conversations: list[list[Message]], sampling: Sampling, seeds: list[int]) -> list[Completion]: ...

    def option_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]: ...



def option_scores_from_top(top: dict, options: list) -> tuple[list[float], int]:
    """Each option's log-prob from a next-token top-K {token: logprob} (token texts or ids, as `options` are).

    An option outside the top K gets the K-th (lowest) value, an upper bound on its true log-prob. With K=20
    and two options this happens only when the model gives an option almost no mass. Returns
    (scores, how many options were outside the top K) so callers can count the bounded ones.
    """
    floor = min(top.values())
    return [float(top.get(o, floor)) for o in options], sum(o not in top for o in options)
