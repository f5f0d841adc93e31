"""The default backend: a transformers causal LM on CPU or GPU.

Generation is our own decode loop rather than `model.generate`, for two reasons: every request samples from
its own seeded `torch.Generator` (HF's sampler draws from the global RNG, so a row's text would depend on
its batch neighbours), and finished rows leave the batch and the KV cache at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cai.backends.base import Completion, Message, Sampling
from cai.models import (
    ModelRef,
    fp16_decode_supported,
    load_causal_lm,
    load_tokenizer,
    precision_name,
    uses_fp16_decode,
)


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
        # and we fall back to a full sort for the rows where they do not. Each row then draws among its sorted
        # candidates only (a multinomial over 256 values, not the whole vocabulary).
        k = min(256, probs.shape[-1])
        sorted_p, order = probs.topk(k, dim=-1)
        if (sorted_p.sum(-1) < sampling.top_p).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        return torch.stack([order[i, torch.multinomial(sorted_p[i], 1, generator=g)[0]] for i, g in enumerate(generators)])
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


@functools.lru_cache(maxsize=2)
def prepack_supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch build has oneDNN's packed linear ops and this CPU can run them in `dtype`: bf16 needs
    AMX or AVX512-BF16-era instructions (on an AVX2-only CPU packing raises); float32 runs on any x86-64 oneDNN
    supports."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
        return False
    try:
        w = torch.zeros(16, 16, dtype=dtype)
        packed = ops._reorder_linear_weight(w, 16)
        ops._linear_pointwise(torch.zeros(1, 16, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


class LinearPhase:
    """Which weights a packed model's linear layers compute from: `decode` is set by the backend around its
    one-token decode steps (see `prepack_linear_weights`); prompts (prefill, option scoring) always run the
    model's own precision."""

    def __init__(self):
        self.decode = False
        self.packed = 0  # linear layers packed
        self.fp16_decode = False  # whether any of them has float16 decode weights
        self.dropped = 0  # packed layers whose own weight was replaced by a placeholder (drop_originals)

    @contextlib.contextmanager
    def decoding(self):
        self.decode, saved = True, self.decode
        try:
            yield
        finally:
            self.decode = saved


def prepack_linear_weights(model, fp16_decode: bool = False, drop_originals: bool = False) -> LinearPhase:
    """Let the bf16 and float32 linear layers of a CPU model compute from weights packed once for oneDNN. Returns
    the model's `LinearPhase` (also `model.cai_linear_phase`); `.packed` counts the layers packed.

    `F.linear` on bf16 CPU tensors lays the weight out for oneDNN's AMX kernels again on every call; packing it
    once (what torch.compile's freezing does, with the same oneDNN ops) made a batch-12 decode step of SmolLM2
    ~20% faster and prefill ~12% faster on the Xeon, with identical logits. In float32 (CPUs without bf16) the
    packed weights stream ~1.6x faster than `F.linear`'s sgemm at decode's 12-32 rows on the AVX2-only EPYC
    (BENCHMARKS.md), with logits equal to rounding. The module keeps its original weight (for state_dict and tied
    embeddings); a weight changed in place after packing, or a copy of the module, computes with `F.linear`
    again; where the ops are missing from the torch build, nothing changes.

    fp16_decode (float32 models only, where `fp16_decode_supported`): each layer also keeps a float16 copy of its
    weight for fbgemm, used while the phase is `decode`. Decode steps are bound by reading the weights (a few
    rows per weight), so half the bytes make their linears 1.7-2.1x faster; activations and sums stay float32,
    and the weights' rounding (11 significant bits) is finer than bf16's (8), the precision of the bf16 CPUs.
    Prefill is compute-bound, where fbgemm's fp16 path is no faster, so prompts keep the float32 weights.

    drop_originals (for a model used only for inference, like the backend's own copy): a packed layer's own
    weight is replaced by a zero-stride placeholder of the same shape and dtype (4 bytes), so the weights are
    held once in each precision they compute in, not once more in the layer (BENCHMARKS.md: the backend's
    resident memory). Weights tied to the input embeddings are kept, as copies: a model loaded in the file's
    dtype holds its weights as views of the safetensors file's memory map, which stays resident as long as any
    of them lives. Parameter counts, shapes and dtypes stay; changing or copying the dropped weights raises,
    since their values are gone. A short probe runs before and after dropping: where the model's code reads a
    Linear's weight other than through the layer (some architectures and remote code do), the logits differ and
    every weight is put back (`.dropped` stays 0).
    """
    import types

    ops = torch.ops.mkldnn
    phase = LinearPhase()
    half_ok = fp16_decode and fp16_decode_supported()
    droppable = []  # (module, its weight, its state) of packed layers whose weight only their forward reads
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or w.device.type != "cpu":
            continue
        packed = (ops._reorder_linear_weight(w.detach(), 16)  # 16: the row-count hint of the packing
                  if w.dtype in (torch.bfloat16, torch.float32) and prepack_supported(w.dtype) else None)
        half = (torch.ops.quantized.linear_prepack_fp16(w.detach(), None if module.bias is None else module.bias.detach())
                if half_ok and w.dtype == torch.float32 else None)
        if packed is not None or half is not None:
            state = {"source": w, "version": w._version, "dropped": False}

            def forward(self, x, packed=packed, half=half, state=state):
                source = state["source"]
                if self.weight is not source or source._version != state["version"]:  # changed since packing, or a copy
                    if state["dropped"]:
                        raise RuntimeError("this model's linear weights were dropped after packing "
                                           "(prepack_linear_weights(drop_originals=True)): it runs inference only, "
                                           "and cannot be changed or copied; load the model again instead")
                    return torch.nn.functional.linear(x, self.weight, self.bias)
                if half is not None and phase.decode:
                    return torch.ops.quantized.linear_dynamic_fp16(x, half)
                if packed is None:
                    return torch.nn.functional.linear(x, self.weight, self.bias)
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

            module.forward = types.MethodType(forward, module)
            phase.packed += packed is not None
            phase.fp16_decode |= half is not None
            if drop_originals and packed is not None and id(w) not in tied:
                droppable.append((module, w, state))
    if droppable:
        _drop_original_weights(model, droppable, phase)
    model.cai_linear_phase = phase
    return phase


def _drop_original_weights(model, droppable: list, phase: LinearPhase) -> None:
    """Replace the layers' own weights by placeholders (see `prepack_linear_weights(drop_originals=True)`), if the
    model then computes exactly what it did: a model whose code reads a Linear's weight other than through the
    layer's forward (some architectures and remote code do) would otherwise compute with the placeholders, so
    a short probe runs before and after, and any difference puts every weight back."""
    probe = torch.arange(min(8, model.config.vocab_size), device="cpu")[None]
    with torch.inference_mode():
        before = model(input_ids=probe).logits
    with torch.inference_mode(False):  # placeholders are ordinary tensors (with a version), whoever calls
        for module, w, state in droppable:  # the values live on in the packed (and fp16) copies
            module.weight = torch.nn.Parameter(torch.zeros((), dtype=w.dtype).expand(w.shape), requires_grad=False)
            state.update(source=module.weight, version=module.weight._version, dropped=True)
    with torch.inference_mode():
        same = torch.equal(model(input_ids=probe).logits, before)
    if not same:
        for module, w, state in droppable:
            module.weight = w
            state.update(source=w, version=w._version, dropped=False)
        return
    phase.dropped = len(droppable)
    # What remains (embeddings, norms) may still be views of the safetensors file's memory map, which keeps the
    # whole file resident, dropped layers included: copies of them let the map go.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if 0 not in t.stride():
                t.data = t.data.clone()


@dataclasses.dataclass
class SharedPrefix:
    """The prefixes that groups of a batch's rows share, held once per group (see `GrowingLayer.share_prefix`).

    keys, values: (groups, kv_heads, width, head_dim), left-padded; mask: (groups, 1, 1, width), 0 where a
    position is real and -inf where it is padding; real: whether each group's prefix has a real position (a row
    alone has none); group: (rows,) the group of each row; members: the rows of each group (index tensors), or
    None when one group holds every row."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    real: list[bool]
    group: torch.Tensor
    members: list[torch.Tensor] | None = None

    def select(self, rows: torch.Tensor) -> SharedPrefix:
        group = self.group[rows]
        members = None if len(self.keys) == 1 else [(group == g).nonzero().squeeze(1) for g in range(len(self.keys))]
        return dataclasses.replace(self, group=group, members=members)


class GrowingLayer(DynamicLayer):
    """A KV-cache layer that writes new positions in place instead of concatenating.

    transformers' DynamicLayer appends by `torch.cat`, which copies the whole cache at every decode step; on a
    CPU with a few GB/s of memory bandwidth that copy cost about a fifth of a batch-12 decode step of SmolLM2
    (BENCHMARKS.md). Here keys and values live in buffers with `extra` positions of room beyond the first
    update (the tokens still to come; doubled when full); `keys`/`values` are views of the filled part.
    Shape: (batch, kv_heads, positions, head_dim).

    After `share_prefix`, the positions so far are a `SharedPrefix`, held once per group of rows, and the
    buffers hold each row's own positions after it; `cascade_attention` reads both. The views returned by
    `update` then carry the layer (`.cai_layer`), which is how the attention function finds the prefix.
    """

    def __init__(self, extra: int = 256):
        super().__init__()
        self.extra = extra
        self.prefix: SharedPrefix | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length, self.key_buffer, self.value_buffer = 0, None, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.key_buffer is None or self.length + n > self.key_buffer.shape[-2]:
            b, h, _, d = key_states.shape
            room = 2 * self.length + n + self.extra
            keys, values = key_states.new_empty(b, h, room, d), value_states.new_empty(b, h, room, d)
            if self.length:
                keys[:, :, :self.length], values[:, :, :self.length] = self.keys, self.values
            self.key_buffer, self.value_buffer = keys, values
        self.key_buffer[:, :, self.length:self.length + n] = key_states
        self.value_buffer[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]
        if self.prefix is not None:
            self.keys.cai_layer = self

    def get_seq_length(self) -> int:
        own = self.length if self.is_initialized and self.key_buffer is not None else 0
        return own + (self.prefix.keys.shape[-2] if self.prefix is not None else 0)

    def share_prefix(self, group: torch.Tensor, prefix_mask: torch.Tensor) -> None:
        """Make the positions cached so far (one row per group, shape (groups, kv_heads, width, head_dim)) the
        shared prefix of the rows whose group is `group` (rows,); prefix_mask (groups, width): 1 where a position
        is real. Each row's own positions start empty."""
        mask = torch.zeros(prefix_mask.shape, dtype=self.keys.dtype, device=self.keys.device)
        mask = mask.masked_fill(prefix_mask == 0, float("-inf"))[:, None, None, :]
        real = (prefix_mask != 0).any(-1).tolist()
        self.prefix = SharedPrefix(self.keys.contiguous(), self.values.contiguous(), mask, real, group).select(
            torch.arange(len(group), device=group.device))
        self.length, self.key_buffer, self.value_buffer = 0, None, None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.prefix is not None:
            self.prefix = self.prefix.select(indices)
        if self.key_buffer is not None and self.length > 0:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (a negative count), as transformers' DynamicLayer does."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): expected a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.prefix is not None and -tokens_to_remove > self.length:
            raise ValueError(f"crop({tokens_to_remove}): only {self.length} positions follow the shared prefix")
        self.length = max(self.length + tokens_to_remove, 0)
        self._views()


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers (see there), each with room for `extra` positions after its first update."""

    def __init__(self, extra: int = 256):
        Cache.__init__(self, layer_class_to_replicate=functools.partial(GrowingLayer, extra=extra))

    def share_prefix(self, group: torch.Tensor, prefix_mask: torch.Tensor) -> None:
        for layer in self.layers:
            layer.share_prefix(group, prefix_mask)


def cascade_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Attention that reads a prefix shared by a group of rows once for the whole group (cascade attention).

    Where a `GrowingLayer` holds a `SharedPrefix`, each row's attention is split in two, both by the CPU's flash
    kernel, which also returns the log-sum-exp of the scores: (1) all the queries of a group's rows against the
    group's prefix, as one batch, and (2) each row's queries against its own positions; the two softmaxes are
    then merged by their log-sum-exps, which is exactly the softmax over both. Before, the prefix's keys and
    values were copied for every row of the group and read once per row at every decode step. Grouped-query
    heads read their key/value head without copies (the query heads of one key/value head are folded into the
    query length). Anything else goes to transformers' SDPA attention, unchanged.

    Shapes: query (b, heads, t, d); key/value (b, kv_heads, own positions, d), the views `GrowingLayer.update`
    returns; attention_mask None or bool (b, 1, t, prefix width + own positions). Returns (b, t, heads, d).
    """
    layer = getattr(key, "cai_layer", None)
    if layer is None or layer.prefix is None or dropout or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    pre = layer.prefix
    b, heads, t, d = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    rep = heads // kv_heads
    width = pre.keys.shape[-2]
    q = query.reshape(b, kv_heads, rep * t, d)  # heads h = kv * rep + j: each kv head's queries, rep * t of them
    if attention_mask is not None:
        allowed = attention_mask[..., width:]
    else:  # transformers leaves the mask out where it is causal with no padding: the own part is causal
        allowed = (torch.arange(own, device=q.device)[None, :] <= torch.arange(t, device=q.device)[:, None] + own - t)
        allowed = allowed.expand(b, 1, t, own)
    seen_own = allowed.any(-1)  # (b, 1, t): padding queries may see none of their own positions
    own_mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    own_mask = own_mask[:, :, None].expand(b, 1, rep, t, own).reshape(b, 1, rep * t, own)
    out_own, lse_own = flash(q, key, value, 0.0, False, attn_mask=own_mask, scale=scaling)
    lse_own = lse_own.masked_fill(~seen_own[:, :, None].expand(b, 1, rep, t).reshape(b, 1, rep * t), float("-inf"))
    if pre.members is None:  # one group: every row's queries against the prefix in one call
        qg = q.transpose(0, 1).reshape(1, kv_heads, b * rep * t, d)
        o, lse = flash(qg, pre.keys, pre.values, 0.0, False, attn_mask=pre.mask, scale=scaling)
        out_pre = o.view(kv_heads, b, rep * t, d).transpose(0, 1)
        lse_pre = lse.view(kv_heads, b, rep * t).transpose(0, 1)
    else:
        out_pre = torch.zeros_like(out_own)
        lse_pre = torch.full_like(lse_own, float("-inf"))
        for g, rows in enumerate(pre.members):
            if len(rows) and pre.real[g]:  # a row alone has an empty prefix
                n = len(rows)
                qg = q[rows].transpose(0, 1).reshape(1, kv_heads, n * rep * t, d)
                o, lse = flash(qg, pre.keys[g:g + 1], pre.values[g:g + 1], 0.0, False, attn_mask=pre.mask[g:g + 1],
                               scale=scaling)
                out_pre[rows] = o.view(kv_heads, n, rep * t, d).transpose(0, 1)
                lse_pre[rows] = lse.view(kv_heads, n, rep * t).transpose(0, 1)
    top = torch.maximum(lse_pre, lse_own).clamp(min=-1e30)[..., None]
    w_pre, w_own = torch.exp(lse_pre[..., None] - top), torch.exp(lse_own[..., None] - top)
    out = (out_pre * w_pre + out_own * w_own) / (w_pre + w_own).clamp(min=1e-30)  # float32 (the lse are)
    return out.to(query.dtype).reshape(b, heads, t, d).transpose(1, 2).contiguous(), None


AttentionInterface.register("cai_cascade", cascade_attention)
AttentionMaskInterface.register("cai_cascade", sdpa_mask)


def shared_prefix_groups(rows: list[list[int]], max_group: int) -> list[tuple[int, list[int]]]:
    """Split token rows into groups that share a prefix: [(prefix_len, [row indices])], each row in one group.

    Sorted rows put the longest shared prefixes side by side, so the groups are runs of the sorted order; the
    runs (at most `max_group` rows each) are chosen to save the most tokens, sum((size - 1) * prefix_len), by
    dynamic programming. With the shared-prefix feedback template, the K principles asked about one pair in
    one order share all but the question, and form one group. prefix_len leaves each row at least one token
    of its own, since its scores are read at its last token; a row alone has prefix_len 0.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i])

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    adjacent = [common(rows[a], rows[b]) for a, b in zip(order, order[1:])]
    best = [0] * (len(order) + 1)  # best[j]: most tokens saved by grouping order[:j]
    cut = [0] * (len(order) + 1)  # where the last group of that best grouping starts
    for j in range(1, len(order) + 1):
        best[j], cut[j] = best[j - 1], j - 1
        shared, shortest = 1 << 30, len(rows[order[j - 1]])
        for i in range(j - 2, max(j - max_group, 0) - 1, -1):  # the group order[i:j]
            shared, shortest = min(shared, adjacent[i]), min(shortest, len(rows[order[i]]))
            saved = best[i] + (j - i - 1) * min(shared, shortest - 1)
            if saved > best[j]:
                best[j], cut[j] = saved, i
    groups, j = [], len(order)
    while j > 0:
        members = order[cut[j]:j]
        n = min(min(len(rows[m]) for m in members) - 1, min(adjacent[cut[j]:j - 1], default=0))
        groups.append((n if len(members) > 1 else 0, members))
        j = cut[j]
    return groups[::-1]


class TransformersBackend:
    def __init__(self, ref: ModelRef, *, dtype: str = "auto", device: str = "auto", batch_size: int = 16,
                 trust_remote_code: bool = False, model=None, tokenizer=None, progress: bool = True):
        configure_cpu_threads()
        self.ref = ref
        self.tokenizer = tokenizer or load_tokenizer(ref, trust_remote_code)
        self.phase = LinearPhase()
        if model is None:  # our own copy, for inference only: linear weights packed for the CPU
            model = load_causal_lm(ref, dtype, device, trust_remote_code)
            self.phase = prepack_linear_weights(model, fp16_decode=uses_fp16_decode(dtype, str(model.device)),
                                                drop_originals=True)
            if (model.device.type == "cpu" and model.config._attn_implementation == "sdpa"
                    and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")):
                model.set_attn_implementation("cai_cascade")  # shared prefixes read once (cascade_attention)
        self.model = model
        self.device = next(self.model.parameters()).device
        # bf16 and fp32 runs of the same weights give different texts and scores: the precision is part of the key
        self.identity = f"{ref.identity}:{precision_name(next(self.model.parameters()).dtype, self.phase.fp16_decode)}"
        self.batch_size = batch_size
        self.progress = progress
        # prompt tokens prefilled (generation and option scoring): "prompt" = in the prompts, "forward" = run
        # through the model (fewer when prompts share a prefix); read by `python -m cai.bench`
        self.prefill_tokens = {"prompt": 0, "forward": 0}
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

    def _prefill(self, rows: list[list[int]], decode_tokens: int = 0):
        """Run prompts (token rows) through the model, into a KV cache with room for `decode_tokens` more.

        Returns the logits at each row's last token (b, vocab), the attention mask (b, width), the position of
        each row's last token (b, 1) and the cache, for decoding to continue from. Rows that share a prefix
        (few-shot demonstrations, the feedback questions about one pair) run it once when that saves a tenth of
        the tokens or more (`shared_prefix_groups`; below that the extra pass and cache copy cost about as much):
        1. each group's prefix, left-padded, fills the cache, shape (groups, prefix width);
        2. for generation, each group's prefix stays one row of the cache, which `cascade_attention` reads once
           for all the group's rows at every step; for scoring (no steps after the prompt), the cache rows are
           repeated for the rows of each group (faster there: 1.48-1.55 against 1.25-1.27 labels/s);
        3. the rows' own tails, left-padded, run on top: mask [prefix mask | tail mask], positions continuing
           from each prefix's real length, so every token attends to exactly what it would in one pass.
        """
        groups = shared_prefix_groups(rows, len(rows))
        total = sum(len(r) for r in rows)
        saved = sum((len(m) - 1) * n for n, m in groups)
        self.prefill_tokens["prompt"] += total
        self.prefill_tokens["forward"] += total - saved if 10 * saved >= total else total
        if 10 * saved < total:  # one plain left-padded pass
            ids, mask = self._left_pad(rows)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = GrowingCache(extra=decode_tokens) if decode_tokens else None
            # logits_to_keep=1: the vocabulary projection only for the last position (prompts can be long)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=cache is not None, logits_to_keep=1)
            return out.logits[:, -1, :], mask, positions[:, -1:], cache
        start = [0] * len(rows)
        group_of = [0] * len(rows)
        for g, (n, members) in enumerate(groups):
            for i in members:
                start[i], group_of[i] = n, g
        tails = [r[n:] for r, n in zip(rows, start)]
        cache = GrowingCache(extra=max(len(t) for t in tails) + decode_tokens)
        p_ids, p_mask = self._left_pad([rows[m[0]][:n] for n, m in groups])
        self.model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0),
                   cache=cache, use_cache=True, logits_to_keep=1)
        sel = torch.tensor(group_of, device=self.device)
        if decode_tokens and self.model.config._attn_implementation == "cai_cascade":
            cache.share_prefix(sel, p_mask)  # each group's prefix stays one row; the rows' own tails follow it
        else:  # option scoring (no decode steps to read the prefix again): copying it measured faster
            cache.batch_select_indices(sel)  # the prefix's cache rows copied for each row of its group
        t_ids, t_mask = self._left_pad(tails)
        positions = torch.tensor(start, device=self.device)[:, None] + (t_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([p_mask[sel], t_mask], dim=1)
        out = self.model(input_ids=t_ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], mask, positions[:, -1:], cache

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
        generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        logits, mask, last_pos, cache = self._prefill(prompts, decode_tokens=sampling.max_new_tokens)
        logits = logits.float().cpu()
        alive = list(range(len(prompts)))  # original row of each row still in the batch
        tokens: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        texts: list[str | None] = [None] * len(prompts)
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
            with self.phase.decoding():  # float16 weight copies where the backend made them (prepack_linear_weights)
                out = self.model(input_ids=nxt.view(-1, 1).to(self.device), attention_mask=mask,
                                 position_ids=last_pos, cache=cache, use_cache=True)
            logits = out.logits[:, -1, :].float().cpu()
        return [Completion(text=texts[r] if texts[r] is not None else self.tokenizer.decode(tokens[r], skip_special_tokens=True),
                           prompt_tokens=len(prompts[r]), completion_tokens=len(tokens[r]), finish_reason=finish[r])
                for r in range(len(prompts))]

    # -- scoring ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def option_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        """log p(option | prompt) for each prompt and option. Shape: (len(prompts), len(options)).

        When every option is one token after the prompt (the usual "A"/"B" case), one forward pass of the
        prompt scores all options at once; otherwise each prompt+option is scored by its own pass. Prompts that
        share most of their tokens (the K feedback principles asked about one pair with the shared-prefix
        template) are batched together and their shared prefix runs once (`_prefill`).
        """
        results: list[list[float]] = [[] for _ in prompts]
        encoded = [self._encode(p) for p in prompts]
        single, multi = {}, []
        for i, (p, ids) in enumerate(zip(prompts, encoded)):
            conts = []
            for o in options:
                full = self._encode(p + o)
                conts.append(full[len(ids):] if full[:len(ids)] == ids else None)
            if all(c is not None and len(c) == 1 for c in conts):
                single[i] = [c[0] for c in conts]
            else:
                multi.append(i)
        rows = list(single)
        groups = shared_prefix_groups([encoded[i] for i in rows], self.batch_size)
        groups = [(n, [rows[j] for j in members]) for n, members in groups]
        # length bucketing: groups of similar prefix length share a forward batch, whole groups per batch
        groups.sort(key=lambda g: (g[0], len(encoded[g[1][0]])))
        chunk: list[tuple[int, list[int]]] = []
        for g in groups + [None]:
            if chunk and (g is None or sum(len(m) for _, m in chunk) + len(g[1]) > self.batch_size):
                members = [i for _, m in chunk for i in m]
                logits = self._prefill([encoded[i] for i in members])[0]
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, i in enumerate(members):
                    results[i] = [float(logp[row, t]) for t in single[i]]
                chunk = []
            if g is not None:
                chunk.append(g)
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
