"""One protocol for every way of running a model.

- `generate(conversations, sampling, seeds)`: chat-templated, batched, seeded sampling with stop strings.
  Each request carries its own seed, so an answer depends only on its own inputs, never on which other
  requests happened to share its batch (this is what makes keyed records and resume exact).
- `option_logprobs(prompts, options)`: log-probability of each option continuation (e.g. "A", "B") right
  after a raw prompt that ends just before the option.
- `chat_prompt(conversation)`: the raw text the model sees for a conversation; a conversation whose last
  message is from the assistant is continued rather than answered (used to put words in the labeler's mouth).

Implementations: `transformers` (default; CPU or GPU), `vllm` (GPU, the `vllm` extra: prefix caching,
continuous batching), `openai` (any OpenAI-compatible server: vLLM serve, llama.cpp server, TGI,
`python -m cai.serve`, hosted APIs) and `fake` (control-flow tests only). Which one runs is an `if/elif` on a
string from the config: no code is imported because a config named it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

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
    from cai.errors import CaiError

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


BACKENDS = ("transformers", "vllm", "openai", "fake")


def option_scores_from_top(top: dict, options: list) -> tuple[list[float], int]:
    """Each option's log-prob from a next-token top-K {token: logprob} (token texts or ids, as `options` are).

    An option outside the top K gets the K-th (lowest) value, an upper bound on its true log-prob. With K=20
    and two options this happens only when the model gives an option almost no mass. Returns
    (scores, how many options were outside the top K) so callers can count the bounded ones.
    """
    floor = min(top.values())
    return [float(top.get(o, floor)) for o in options], sum(o not in top for o in options)


def check_backend(section, name: str) -> None:
    """Fail before anything is written when a ModelConfig section names a backend this machine cannot run."""
    from cai.errors import CaiError

    if section.backend not in BACKENDS:
        raise CaiError(f"{name}.backend={section.backend}: expected one of {', '.join(BACKENDS)}")
    if section.backend == "vllm":
        from cai.backends.vllm_backend import require_vllm

        require_vllm(f"{name}.backend=vllm")


def release(backend) -> None:
    """Free a backend's memory now (vLLM holds GPU memory until its engine shuts down; training may follow)."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def make_backend(kind: str, model: str, *, dtype: str = "auto", device: str = "auto", batch_size: int = 16,
                 trust_remote_code: bool = False, base_url: str = "", tokenizer: str = "",
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8, gpu_memory_utilization: float = 0.85,
                 max_model_len: int = 0, enable_prefix_caching: bool = True,
                 tensor_parallel_size: int = 1) -> Backend:
    from cai.errors import CaiError

    if kind == "transformers":
        from cai.backends.transformers_backend import TransformersBackend
        from cai.models import resolve_model

        return TransformersBackend(resolve_model(model), dtype=dtype, device=device, batch_size=batch_size,
                                   trust_remote_code=trust_remote_code)
    elif kind == "vllm":
        from cai.backends.vllm_backend import VLLMBackend, require_vllm
        from cai.models import resolve_model

        require_vllm("backend=vllm")
        return VLLMBackend(resolve_model(model), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code)
    elif kind == "openai":
        from cai.backends.openai_backend import OpenAIBackend

        if not base_url:
            raise CaiError("backend=openai needs base_url (e.g. http://127.0.0.1:8000/v1 without the /v1)")
        return OpenAIBackend(base_url, model, tokenizer=tokenizer or None, api_key_env=api_key_env,
                             concurrency=concurrency)
    elif kind == "fake":
        from cai.backends.fake import FakeBackend

        return FakeBackend(model)
    raise CaiError(f"backend={kind}: expected one of {', '.join(BACKENDS)}")
