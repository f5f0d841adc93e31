"""Keyed work in planned batches: the mechanism behind exact resume for every generating stage.

A wave is a list of requests, each with a key. Requests whose key is already in the store are reused. Before
a wave starts, its batches are fixed in a plan file; a batched forward pass gives slightly different floats
for a row depending on its batch neighbours and padding (bf16 especially), so a resumed run replays exactly
the planned batches (a whole batch, when any of its records is missing) and stores only what is missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from cai.backends import Backend, Message, Sampling
from cai.io import write_atomic
from cai.records import stable_hash
from cai.store import JsonlStore


@dataclass
class Request:
    """One text to generate."""

    key: str
    kind: str  # answer | critique | revision | label | ...
    conversation: list[Message]
    meta: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.key[:15], 16)  # per-request seed derived from the key


@dataclass
class WaveStats:
    generated: int = 0
    reused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def run_wave(requests: list[Request], store: JsonlStore, compute: Callable[[list[Request]], list[dict]],
             plan_dir: Path, batch_size: int, label: str, identity: str, progress: bool = True,
             unit: str = "txt", bucket: Callable[[Request], tuple] | None = None) -> tuple[WaveStats, set[str]]:
    """Compute every request whose key is not in the store, in planned batches; append each batch.

    `compute(batch)` returns one dict of record fields per request; `identity` names what computes them
    (model identity and settings), so a plan is never replayed by something else. `bucket(request)` orders
    requests into batches (default: by conversation length); labels use it to keep the requests that share a
    prompt prefix in one batch.
    """
    stats, generated = WaveStats(), set()
    by_key = {r.key: r for r in requests}  # identical requests (same key) are computed once
    missing = [r for r in by_key.values() if r.key not in store]
    stats.reused = len(by_key) - len(missing)
    wave_id = stable_hash([sorted(by_key), batch_size, identity])
    plan_path = plan_dir / f"{label.replace(' ', '_').replace('/', '-')}-{wave_id}.json"
    if not missing:  # done (perhaps by a run killed after its last batch, before it removed the plan)
        plan_path.unlink(missing_ok=True)
        return stats, generated
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if plan is None or any(k not in by_key for chunk in plan for k in chunk):
        # length bucketing: similar lengths share a batch, so little padding
        ordered = sorted(missing, key=lambda r: (bucket(r) if bucket else sum(len(m["content"]) for m in r.conversation),
                                                 r.key))
        plan = [[r.key for r in ordered[i:i + batch_size]] for i in range(0, len(ordered), batch_size)]
        write_atomic(plan_path, json.dumps(plan))
    bar = tqdm(total=len(missing), desc=label, unit=unit, disable=not progress, leave=True)
    for chunk in plan:
        if all(k in store for k in chunk):
            continue
        batch = [by_key[k] for k in chunk]  # the whole planned batch, so results match the original run
        start = time.time()
        outs = compute(batch)
        seconds = time.time() - start
        records = [{"key": r.key, "kind": r.kind, **out, "seconds": round(seconds / len(batch), 4), **r.meta}
                   for r, out in zip(batch, outs) if r.key not in store]
        store.append(records)
        generated.update(rec["key"] for rec in records)
        stats.generated += len(records)
        stats.prompt_tokens += sum(rec.get("prompt_tokens", 0) for rec in records)
        stats.completion_tokens += sum(rec.get("completion_tokens", 0) for rec in records)
        stats.seconds += seconds
        bar.update(len(records))
        if stats.completion_tokens:
            bar.set_postfix(tok_s=f"{stats.completion_tokens / max(stats.seconds, 1e-9):.1f}")
    bar.close()
    plan_path.unlink(missing_ok=True)  # the wave is complete: its plan is no longer needed
    return stats, generated


def generation(backend: Backend, sampling: Sampling) -> Callable[[list[Request]], list[dict]]:
    """A `compute` for run_wave that samples one text per request (seeded by its key)."""

    def compute(batch: list[Request]) -> list[dict]:
        outs = backend.generate([r.conversation for r in batch], sampling, [r.seed for r in batch])
        return [{"text": c.text, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                 "finish_reason": c.finish_reason, "seed": r.seed} for r, c in zip(batch, outs)]

    return compute


def generation_identity(backend: Backend, sampling: Sampling) -> str:
    return stable_hash([backend.identity, sampling.as_dict()])
