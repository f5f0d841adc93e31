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

from cai.backends.base import Backend, Completion, Message, Sampling, option_scores_from_top, sampling_from_config  # noqa: F401
from cai.backends.fake import FakeBackend
from cai.backends.openai_backend import OpenAIBackend
from cai.backends.vllm_backend import VLLMBackend, require_vllm
from cai.config import BACKENDS
from cai.errors import CaiError
from cai.models import resolve_model


def backend_options(m) -> dict:
    """make_backend keyword arguments from a ModelConfig section."""
    return dict(dtype=m.dtype, device=m.device, batch_size=m.batch_size, trust_remote_code=m.trust_remote_code,
                base_url=m.base_url, tokenizer=m.tokenizer, api_key_env=m.api_key_env, concurrency=m.concurrency,
                gpu_memory_utilization=m.gpu_memory_utilization, max_model_len=m.max_model_len,
                enable_prefix_caching=m.enable_prefix_caching, tensor_parallel_size=m.tensor_parallel_size)


def backend_for(m, model: str | None = None, progress: bool | None = None) -> Backend:
    """The backend a ModelConfig section describes (model overrides its `model`, e.g. a resolved path)."""
    b = make_backend(m.backend, model or m.model, **backend_options(m))
    if progress is not None and hasattr(b, "progress"):
        b.progress = progress
    return b


def check_backend(section, name: str) -> None:
    """Fail before anything is written when a ModelConfig section names a backend this machine cannot run."""
    if section.backend not in BACKENDS:
        raise CaiError(f"{name}.backend={section.backend}: expected one of {', '.join(BACKENDS)}")
    if section.backend == "vllm":
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
    if kind == "transformers":
        from cai.backends.transformers_backend import TransformersBackend  # heavy: torch, transformers

        return TransformersBackend(resolve_model(model), dtype=dtype, device=device, batch_size=batch_size,
                                   trust_remote_code=trust_remote_code)
    elif kind == "vllm":
        require_vllm("backend=vllm")
        return VLLMBackend(resolve_model(model), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code)
    elif kind == "openai":
        if not base_url:
            raise CaiError("backend=openai needs base_url (e.g. http://127.0.0.1:8000/v1 without the /v1)")
        return OpenAIBackend(base_url, model, tokenizer=tokenizer or None, api_key_env=api_key_env,
                             concurrency=concurrency)
    elif kind == "fake":
        return FakeBackend(model)
    raise CaiError(f"backend={kind}: expected one of {', '.join(BACKENDS)}")
