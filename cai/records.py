"""The records that flow between stages, as typed dataclasses, and the hashes that key them. Torch-free.

Every record is built here, once, and written as JSONL by `to_json()` (the file format is the dict it
returns; `datasets.load_dataset("json", ...)` reads it). Readers get plain dicts back from the files.

- `stable_hash`: the basis of every key (a hash of everything that determines a record).
- `pair_identity`: a pair of answers to one prompt, whichever answer was shown first; AI labels, human labels
  and the labeling page's labels of the same pair match on it.
- `Pair` (two answers to one prompt), `Comparison` (a soft label P(answer_a is better), from the AI labeler
  or a person), `SFTExample` (a prompt/completion conversation: a revision, a helpful answer or a human
  demonstration), `CalibrationBin`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


def stable_hash(obj: Any, n: int = 24) -> str:
    """Hash of a JSON-able object, independent of key order: the basis of every record key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:n]


def pair_identity(record: dict) -> tuple[str, str, str]:
    """The same for (a, b) and (b, a): pairs and comparisons from different sources match on the texts."""
    a, b = sorted([record["answer_a"], record["answer_b"]])
    return record["prompt"], a, b


def pair_hash(prompt: str, answer_a: str, answer_b: str, kind: str = "human-pair", n: int = 24) -> str:
    """A hash of the pair's identity (the same for either order); `kind` keeps older keys as they were."""
    a, b = sorted([answer_a, answer_b])
    return stable_hash({"kind": kind, "prompt": prompt, "answers": [a, b]}, n)


def prompt_id_for(prompt: str) -> str:
    """The id of a prompt that came without one (human files, the labeling page)."""
    return "human-" + stable_hash({"prompt": prompt}, 12)


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@dataclass
class Pair:
    """Two answers to one prompt, to be labeled. `source` says where the two answers came from."""

    key: str
    prompt_id: str
    prompt: str
    category: str
    answer_a: str
    answer_b: str
    model: str
    answer_keys: list[str]
    source: str = "sample"
    prompt_set: str = ""  # which prompt source: red_team | helpful | a file's name

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    """P(answer_a is better) for one pair, from one source (ai | human), with what produced it."""

    key: str
    pair_key: str
    prompt_id: str
    prompt: str
    category: str
    answer_a: str
    answer_b: str
    source: str  # ai | human
    annotator: str  # the labeler's model identity, or a person's name
    soft_label: float
    agree: Optional[bool] = None  # AI: whether both orders preferred the same answer
    principles: list[dict] = field(default_factory=list)
    cot: bool = False
    extra: dict = field(default_factory=dict)  # e.g. ranking_size, pair_source, prompt_set

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def human_comparison(prompt: str, prompt_id: str, category: str, a: str, b: str, annotator: str, soft: float,
                     **extra) -> dict:
    """A person's label of a pair, from an imported file or the labeling page (keyed by what determines it)."""
    key = stable_hash({"kind": "human-label", "prompt": prompt, "answer_a": a, "answer_b": b,
                       "annotator": annotator, "soft_label": soft, **extra})
    return Comparison(key=key, pair_key=pair_hash(prompt, a, b), prompt_id=prompt_id, prompt=prompt,
                      category=category, answer_a=a, answer_b=b, source="human", annotator=annotator,
                      soft_label=soft, extra=extra).to_json()


@dataclass
class SFTExample:
    """A prompt/completion conversation for SFT (TRL computes the loss on the completion only)."""

    key: str
    source: str  # revision | helpful | human
    prompt_id: str
    round: int
    prompt: list[dict]
    completion: list[dict]
    annotator: Optional[str] = None

    def to_json(self) -> dict:
        out = asdict(self)
        if out["annotator"] is None:
            del out["annotator"]
        return out


def sft_example(key: str, source: str, prompt_id: str, round_: int, prompt: str, answer: str) -> dict:
    return SFTExample(key, source, prompt_id, round_, user_turn(prompt), assistant_turn(answer)).to_json()


def demonstration(prompt: str, answer: str, annotator: str, prompt_id: str) -> dict:
    """A human-written answer as an SFT example (an imported file's, or the labeling page's better answer)."""
    key = stable_hash({"kind": "human-demo", "prompt": prompt, "answer": answer, "annotator": annotator})
    return SFTExample(key, "human", prompt_id, 0, user_turn(prompt), assistant_turn(answer), annotator).to_json()


@dataclass
class CalibrationBin:
    """One equal-width bin of a predicted probability: how many, mean prediction, mean label."""

    lo: float
    hi: float
    count: int
    mean_predicted: float
    mean_label: float

    def to_json(self) -> dict:
        return asdict(self)


def calibration_bins(pred: list[float], target: list[float], n_bins: int = 10) -> list[dict]:
    """Equal-width bins of a predicted probability: count, mean prediction and mean target per non-empty bin."""
    out = []
    for b in range(n_bins):
        sel = [(p, t) for p, t in zip(pred, target) if min(int(p * n_bins), n_bins - 1) == b]
        if sel:
            out.append(CalibrationBin(b / n_bins, (b + 1) / n_bins, len(sel), sum(p for p, _ in sel) / len(sel),
                                      sum(t for _, t in sel) / len(sel)).to_json())
    return out


def expected_calibration_error(bins: list[dict]) -> float:
    n = sum(b["count"] for b in bins)
    return sum(b["count"] / n * abs(b["mean_predicted"] - b["mean_label"]) for b in bins) if n else 0.0
