"""The vLLM backend (GPU; `pip install -e '.[vllm]'`): continuous batching and prefix caching.

- Prompts go in as token ids from our own tokenizer and chat template (`chat_prompt`, the same text the
  transformers backend builds, encoded without special tokens), so both backends see identical prompts.
- Generation: one `SamplingParams` per request with `seed=` the request's seed, so an answer depends on its
  own key, not on its batch. Stop strings, max_tokens, temperature/top_p/top_k map one to one; the stop token
  ids are the same EOS ids the transformers backend stops at.
- Why two requests per answer pair rather than `n=2`: with `n` and a seed, vLLM seeds child i with seed + i
  (`vllm/v1/engine/parallel_sampling.py`), so the two answers could not keep the seeds their keys give them.
  Prefix caching makes the second request of a pair cheap anyway: its prompt's KV blocks are already cached.
- Option scoring: `max_tokens=1` with `logprobs=K` reads the next-token top K (prompt log-prob requests would
  bypass the prefix cache); options are mapped to token ids by tokenizing prompt + option. An option outside
  the top K gets the K-th value as an upper bound (`option_scores_from_top`; counted in `missed_options`).
  An option that is not one token after the prompt is scored from prompt log-probs of prompt + option.
- The identity is the model's plus `vllm:<dtype>`: vLLM's kernels give other floats than transformers', so
  its records must not be mistaken for the transformers backend's.

`vllm` is imported when the backend is built, never at module import: this file's pure parts run on CPU.
"""

from __future__ import annotations

import gc
import importlib.util
from typing import Callable

from cai.backends.base import Completion, Message, Sampling, option_scores_from_top
from cai.errors import CaiError
from cai.models import ModelRef, load_tokenizer, pick_dtype

TOP_LOGPROBS = 20  # vLLM's default max_logprobs


def require_vllm(what: str) -> None:
    """A one-line CaiError unless vllm is importable and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        raise CaiError(f"{what} needs the vllm package (CUDA GPU only): pip install -e '.[vllm]'")
    import torch

    if not torch.cuda.is_available():
        raise CaiError(f"{what} needs a CUDA GPU and none is visible; use backend=transformers on this machine")


def vllm_identity(ref: ModelRef, dtype: str) -> str:
    """The identity a VLLMBackend of this model and dtype setting reports (found without starting vLLM)."""
    return f"{ref.identity}:vllm:{str(pick_dtype(dtype, 'cuda')).removeprefix('torch.')}"


def chat_text(tokenizer, conversation: list[Message]) -> str:
    """The raw prompt, exactly as the transformers backend builds it: a conversation ending with an assistant
    message is continued (the labeler's "The answer is: (" prefix), any other gets the assistant header."""
    if conversation[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def option_token_ids(encode: Callable[[str], list[int]], prompt: str, options: list[str]) -> list[int] | None:
    """The token id of each option right after `prompt`, or None when some option is not exactly one token
    there (tokenized jointly: "(" + "A" may merge into one token, and then "A" is not the next token)."""
    ids = encode(prompt)
    out = []
    for option in options:
        full = encode(prompt + option)
        if full[:len(ids)] != ids or len(full) != len(ids) + 1:
            return None
        out.append(full[-1])
    return out


def sampling_params_kwargs(sampling: Sampling, seed: int, stop_token_ids: list[int]) -> dict:
    """vLLM SamplingParams keyword arguments for one request of `generate`."""
    kwargs = dict(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                  top_k=sampling.top_k or -1,  # -1 = off in every vLLM version (0 only in newer ones)
                  seed=int(seed) % (2**63), stop_token_ids=list(stop_token_ids), skip_special_tokens=True)
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    return kwargs


def completion_from_output(output, prompt_tokens: int, eos_ids: set[int]) -> Completion:
    """A Completion from a vLLM CompletionOutput (text, token_ids, finish_reason, stop_reason).

    finish_reason "length" -> length; a string stop_reason is a stop string -> stop; else EOS or a stop token
    id -> eos. The EOS token is not counted in completion_tokens, as in the transformers backend.
    """
    tokens = list(output.token_ids)
    if output.finish_reason == "length":
        reason = "length"
    elif isinstance(output.stop_reason, str):
        reason = "stop"
    else:
        reason = "eos"
    if reason == "eos" and tokens and tokens[-1] in eos_ids:
        tokens = tokens[:-1]
    return Completion(text=output.text, prompt_tokens=prompt_tokens, completion_tokens=len(tokens),
                      finish_reason=reason)


def continuation_logprob(prompt_logprobs: list, full_ids: list[int], n_prompt: int) -> float:
    """Sum of the log-probs of full_ids[n_prompt:] from vLLM's prompt_logprobs (one {id: Logprob} per prompt
    token, None for the first), split at the prompt's own length as the transformers backend does."""
    return float(sum(prompt_logprobs[t][full_ids[t]].logprob for t in range(max(n_prompt, 1), len(full_ids))))


class VLLMBackend:
    def __init__(self, ref: ModelRef, *, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 enable_prefix_caching: bool = True, max_model_len: int = 0, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, top_logprobs: int = TOP_LOGPROBS, progress: bool = True):
        from vllm import LLM

        if not 0 < gpu_memory_utilization <= 1:
            raise CaiError(f"gpu_memory_utilization={gpu_memory_utilization}: expected 0 < value <= 1")
        self.ref = ref
        self.tokenizer = load_tokenizer(ref, trust_remote_code)
        dtype_name = str(pick_dtype(dtype, "cuda")).removeprefix("torch.")
        self.identity = vllm_identity(ref, dtype)
        self.top_logprobs = top_logprobs
        self.progress = progress
        self.missed_options = 0  # options scored by the top-K bound because they were not in the top K
        self.llm = LLM(model=ref.path, tokenizer=ref.path, dtype=dtype_name, seed=0,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                       max_model_len=max_model_len or None, tensor_parallel_size=tensor_parallel_size,
                       trust_remote_code=trust_remote_code, max_logprobs=max(top_logprobs, TOP_LOGPROBS))
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(ref.path).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)

    def chat_prompt(self, conversation: list[Message]) -> str:
        return chat_text(self.tokenizer, conversation)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: list[list[Message]], sampling: Sampling, seeds: list[int]) -> list[Completion]:
        from vllm import SamplingParams

        assert len(conversations) == len(seeds)
        prompts = [self._encode(self.chat_prompt(c)) for c in conversations]
        params = [SamplingParams(**sampling_params_kwargs(sampling, s, sorted(self.eos_ids))) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=self.progress)
        return [completion_from_output(o.outputs[0], len(ids), self.eos_ids) for o, ids in zip(outs, prompts)]

    def option_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        """log p(option | prompt). Shape: (len(prompts), len(options)). One-token options (the usual "A"/"B"):
        one request per prompt, `max_tokens=1`, top-K logprobs. Others: prompt log-probs of prompt + option."""
        from vllm import SamplingParams

        results: list[list[float]] = [[] for _ in prompts]
        option_ids = [option_token_ids(self._encode, p, options) for p in prompts]
        single = [i for i, ids in enumerate(option_ids) if ids is not None]
        if single:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)
            outs = self.llm.generate([{"prompt_token_ids": self._encode(prompts[i])} for i in single], params,
                                     use_tqdm=self.progress)
            for i, out in zip(single, outs):
                top = {tid: lp.logprob for tid, lp in out.outputs[0].logprobs[0].items()}
                results[i], missed = option_scores_from_top(top, option_ids[i])
                self.missed_options += missed
        multi = [(i, o) for i, ids in enumerate(option_ids) if ids is None for o in options]
        if multi:
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
            full = [self._encode(prompts[i] + o) for i, o in multi]
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in full], params, use_tqdm=self.progress)
            for (i, _), ids, out in zip(multi, full, outs):
                results[i].append(continuation_logprob(out.prompt_logprobs, ids, len(self._encode(prompts[i]))))
        return results

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (a trainer may need it next, in the same process)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):  # the V1 engine runs in its own process
            core.shutdown()
        del llm
        gc.collect()
        import torch

        torch.cuda.empty_cache()
