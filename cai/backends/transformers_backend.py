"""The default backend: a transformers causal LM on CPU or GPU.

Generation is our own decode loop rather than `model.generate`, for two reasons: every request samples from
its own seeded `torch.Generator` (HF's sampler draws from the global RNG, so a row's text would depend on
its batch neighbours), and finished rows leave the batch and the KV cache at once.
"""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from cai.backends import Completion, Message, Sampling
from cai.models import ModelRef, load_causal_lm, load_tokenizer


def configure_cpu_threads() -> None:
    """CPU settings, chosen on purpose (see BENCHMARKS.md): one thread per core, denormals flushed to zero.

    Denormal floats take a slow microcode path on x86; flushing them costs nothing measurable in accuracy for
    inference and sampling. `CAI_THREADS` overrides the thread count.
    """
    threads = int(os.environ.get("CAI_THREADS", "0")) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def sample_next(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """Pick one token per row. logits: (b, vocab) float32 -> (b,) long. Greedy when temperature == 0."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        # nucleus: keep the smallest set of tokens whose mass reaches top_p (the top token always stays).
        # Sorting the whole vocabulary every step is slow; the top 256 almost always hold the nucleus,
        # and we fall back to a full sort for the rows where they do not.
        k = min(256, probs.shape[-1])
        sorted_p, order = probs.topk(k, dim=-1)
        if (sorted_p.sum(-1) < sampling.top_p).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


class TransformersBackend:
    def __init__(self, ref: ModelRef, *, dtype: str = "auto", device: str = "auto", batch_size: int = 16,
                 trust_remote_code: bool = False, model=None, tokenizer=None, progress: bool = True):
        configure_cpu_threads()
        self.ref = ref
        self.tokenizer = tokenizer or load_tokenizer(ref, trust_remote_code)
        self.model = model if model is not None else load_causal_lm(ref, dtype, device, trust_remote_code)
        self.device = next(self.model.parameters()).device
        # bf16 and fp32 runs of the same weights give different texts and scores: the dtype is part of the key
        self.identity = f"{ref.identity}:{str(next(self.model.parameters()).dtype).removeprefix('torch.')}"
        self.batch_size = batch_size
        self.progress = progress
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)

    # -- prompts ---------------------------------------------------------------------------------------
    def chat_prompt(self, conversation: list[Message]) -> str:
        if conversation[-1]["role"] == "assistant":
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape: (b, max_len) ids and attention mask, padded on the left."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, conversations: list[list[Message]], sampling: Sampling, seeds: list[int]) -> list[Completion]:
        """Batches are formed by prompt length (length bucketing), so padding stays small."""
        assert len(conversations) == len(seeds)
        prompts = [self._encode(self.chat_prompt(c)) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generate", unit="ans", disable=not self.progress, leave=False)
        generated = 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, c in zip(idx, self._generate_batch([prompts[i] for i in idx], sampling, [seeds[i] for i in idx])):
                results[i] = c
                generated += c.completion_tokens
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{generated / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        bar.close()
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[Completion]:
        from transformers import DynamicCache

        ids, mask = self._left_pad(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        # logits_to_keep=1: the vocabulary projection only for the last position (prompts can be long)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float().cpu()
        alive = list(range(len(prompts)))  # original row of each row still in the batch
        tokens: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        texts: list[str | None] = [None] * len(prompts)
        last_pos = positions[:, -1:]
        for _ in range(sampling.max_new_tokens):
            nxt = sample_next(logits, sampling, [generators[r] for r in alive])
            keep = []
            for j, r in enumerate(alive):
                t = int(nxt[j])
                if t in self.eos_ids:
                    finish[r] = "eos"
                    continue
                tokens[r].append(t)
                if sampling.stop:
                    text = self.tokenizer.decode(tokens[r], skip_special_tokens=True)
                    cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
                    if cut >= 0:
                        texts[r], finish[r] = text[:cut], "stop"
                        continue
                keep.append(j)
            if not keep or len(tokens[alive[keep[0]]]) >= sampling.max_new_tokens:
                break
            if len(keep) < len(alive):  # finished rows leave the batch and the cache
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, last_pos, nxt = mask[sel], last_pos[sel], nxt[sel.cpu()]
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=nxt.view(-1, 1).to(self.device), attention_mask=mask, position_ids=last_pos,
                             past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :].float().cpu()
        return [Completion(text=texts[r] if texts[r] is not None else self.tokenizer.decode(tokens[r], skip_special_tokens=True),
                           prompt_tokens=len(prompts[r]), completion_tokens=len(tokens[r]), finish_reason=finish[r])
                for r in range(len(prompts))]

    # -- scoring ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def option_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        """log p(option | prompt) for each prompt and option. Shape: (len(prompts), len(options)).

        When every option is one token after the prompt (the usual "A"/"B" case), one forward pass of the
        prompt scores all options at once; otherwise each prompt+option is scored by its own pass.
        """
        results: list[list[float]] = [[] for _ in prompts]
        encoded = [self._encode(p) for p in prompts]
        single, multi = [], []
        for i, (p, ids) in enumerate(zip(prompts, encoded)):
            conts = []
            for o in options:
                full = self._encode(p + o)
                conts.append(full[len(ids):] if full[:len(ids)] == ids else None)
            if all(c is not None and len(c) == 1 for c in conts):
                single.append((i, [c[0] for c in conts]))
            else:
                multi.append(i)
        order = sorted(single, key=lambda x: len(encoded[x[0]]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ids, mask = self._left_pad([encoded[i] for i, _ in chunk])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1, :]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, (i, option_ids) in enumerate(chunk):
                results[i] = [float(logp[row, t]) for t in option_ids]
        for i in multi:
            results[i] = [self._continuation_logprob(prompts[i], o) for o in options]
        return results

    def _continuation_logprob(self, prompt: str, option: str) -> float:
        """Sum of log-probs of the option's tokens after the prompt (tokenized jointly, split at the prompt)."""
        n_prompt = len(self._encode(prompt))
        full = self._encode(prompt + option)
        ids = torch.tensor([full], device=self.device)
        logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1).cpu()
        return float(sum(logp[t - 1, full[t]] for t in range(max(n_prompt, 1), len(full))))
