"""A stand-in model for control-flow unit tests (like lm-eval's DummyLM): no weights, instant, deterministic.

Its text is a hash of the request and the seed, so tests of keying, resume and counting can run without a
model. Every feature is also tested against the real `tiny` model; this is never the only test of anything.
"""

from __future__ import annotations

import hashlib
import json
import math

from cai.backends.base import Completion, Message, Sampling


class FakeBackend:
    def __init__(self, name: str = "fake"):
        self.identity = f"fake:{name}"
        self.calls: list[int] = []  # batch sizes seen, for tests

    def chat_prompt(self, conversation: list[Message]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in conversation) + (
            "" if conversation[-1]["role"] == "assistant" else "<assistant>")

    def generate(self, conversations: list[list[Message]], sampling: Sampling, seeds: list[int]) -> list[Completion]:
        self.calls.append(len(conversations))
        out = []
        for conv, seed in zip(conversations, seeds):
            digest = hashlib.sha256(json.dumps([conv, seed, sampling.as_dict()]).encode()).hexdigest()
            words = [f"w{digest[i:i + 4]}" for i in range(0, 4 * min(sampling.max_new_tokens, 8), 4)]
            out.append(Completion(" ".join(words), sum(len(m["content"]) for m in conv), len(words),
                                  "length" if len(words) == sampling.max_new_tokens else "eos"))
        return out

    def option_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        """Hash-derived scores, normalized so the options' probabilities sum to one."""
        rows = []
        for p in prompts:
            raw = [int(hashlib.sha256((p + o).encode()).hexdigest()[:8], 16) / 16**8 + 0.05 for o in options]
            total = sum(raw)
            rows.append([math.log(r / total) for r in raw])
        return rows
