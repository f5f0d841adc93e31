"""RL-CAI: PPO against the preference model, with a per-token KL penalty to the SL-CAI model.

The loop (Ziegler et al. 2019 https://arxiv.org/abs/1909.08593; Ouyang et al. 2022 InstructGPT
https://arxiv.org/abs/2203.02155; Bai et al. 2022 CAI section 4 https://arxiv.org/abs/2212.08073), per step:
  1. rollout: sample answers to a batch of chat-templated prompts with the policy (seeded per row);
  2. score: `reward_fn(prompts, answers)` (the PM), minus `missing_eos_penalty` for cut-off answers;
  3. per-token rewards = -beta * KL(policy || reference) on every answer token, plus the score on the last;
  4. advantages by GAE over the value model's per-token values, whitened;
  5. ppo_epochs x minibatches of clipped policy loss + vf_coef * clipped value loss (+ ptx_coef * SFT loss).
All maths is in `cai.losses`; this file is the loop. It runs on `accelerate`: the policy and value model are one
prepared module with one optimizer (as TRL's PolicyAndValueWrapper), so `accelerate launch` with a DDP or
DeepSpeed ZeRO-2 config runs this same loop; each process rolls out its own `rollout_batch_size` prompts.
Memory: each phase's end logs the resident set (`rl/ppo/rss_gib/<phase>`) and the peak so far, and the summary
names the phase in which the run's peak was reached (docs/SCALE.md's memory model, checked against it).
ZeRO-3 and FSDP are refused: rollouts and the frozen reference need whole weights on every process (see
`cai.launch.sharded_launch`).

Checkpoints (`out_dir/checkpoints/step-N/`, written to a temp dir and renamed) hold `accelerator.save_state`
(policy + value weights, optimizer, RNG states) and `ppo_state.json` (step, KL coefficient, reward history);
a rerun resumes from the newest one. The trained policy goes to `out_dir/policy/` (safetensors + tokenizer +
`cai_train.json`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from cai.backends.base import Sampling
from cai.backends.transformers_backend import configure_cpu_threads, sample_next
from cai.config import PPOConfig, config_dict, validate
from cai.errors import CaiError, NonFiniteError
from cai.io import write_atomic
from cai.launch import sharded_launch
from cai.losses import (
    AdaptiveKLController,
    FixedKLController,
    check_finite,
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rewards_with_kl,
)
from cai.measures import degeneration
from cai.models import ModelRef, load_tokenizer, resolve_model, safetensors_only
from cai.train.common import (
    ADAPTER_DIR,
    TRAIN_INFO,
    first_non_finite,
    is_lora,
    memory_gib,
    save_pretrained_merged,
    swap_into_place,
    use_bf16,
    with_lora,
)

STATE_FILE = "ppo_state.json"
RewardFn = Callable[[list[str], list[str]], list[float]]


# --- small pieces ----------------------------------------------------------------------------------------


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every answer that ended without EOS. Shape: (b,), (b,) bool -> (b,).

    A cut-off answer is usually a rambling one; without this the policy can learn to pad answers to the
    length limit (TRL's `missing_eos_penalty`). None leaves the scores as they are.
    """
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def _config_record(cfg) -> dict:
    """The config as plain data, from a PPOConfig (Python callers) or its OmegaConf node (the pipeline)."""
    return asdict(cfg) if is_dataclass(cfg) else config_dict(cfg)


def _row_seed(seed: int, step: int, row: int) -> int:
    """A sampling seed per (run seed, step, global row): a resumed run draws the same answers."""
    return int(hashlib.sha256(f"{seed}:{step}:{row}".encode()).hexdigest()[:15], 16)


def _disable_dropout(model: nn.Module) -> None:
    # PPO's ratio compares two forward passes of the same weights; dropout would make it noise (as TRL does).
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape: (b, max_len) ids and attention mask, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _linears_to_bf16(model: nn.Module) -> None:
    """Store a frozen model's Linear weights in bf16 (all else fp32, and every tensor in its own memory).

    Exact under bf16 autocast: autocast rounds an fp32 Linear weight to bf16 before every matmul, which is this
    same rounding done once; embeddings and norms, which autocast leaves in fp32, stay fp32 (a tied lm_head
    stays the fp32 embedding). Saves ~40% of the reference's memory (~210 MB on SmolLM2-135M). The clones drop
    the last views into the mmapped checkpoint, so its pages leave RSS too.
    """
    embedding, seen = model.get_input_embeddings().weight, set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # a tied weight is one Parameter in two modules
                seen.add(id(p))
                is_linear = isinstance(module, nn.Linear) and p is not embedding
                p.data = p.data.to(torch.bfloat16) if is_linear else p.data.clone()
    for b in model.buffers():
        b.data = b.data.clone()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps freed buffers (last step's gradients, a checkpoint
    save's copies: ~2 GB on SmolLM2-135M), and their fragments would add to the next peak RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PolicyAndValue(nn.Module):
    """The trainable policy and value model as one module, so accelerate wraps one model and one optimizer.

    forward(input_ids, attention_mask, n_response) on prompt+answer rows returns, for the last n_response
    positions, the policy logits that predicted each answer token and the value of the state before it:
    logits (b, n_response, vocab), values (b, n_response); and the SFT loss when a ptx batch is given.

    The value model is either separate (`value_model`: an AutoModelForSequenceClassification, backbone + `score`
    head, possibly with LoRA adapters) or shared (`value_head`: a linear head on the policy's own last hidden
    state, from the same forward pass, as TRL's original AutoModelForCausalLMWithValueHead).
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, value_head: nn.Module | None = None):
        super().__init__()
        if (value_model is None) == (value_head is None):
            raise ValueError("PolicyAndValue: expected a value_model or a value_head, not both or neither")
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head

    def forward(self, input_ids, attention_mask, n_response: int, ptx_input_ids=None, ptx_attention_mask=None,
                ptx_labels=None):
        positions = _positions(attention_mask)
        shared = self.value_head is not None
        # logits_to_keep: only the positions that predict answer tokens go through the vocabulary projection
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          logits_to_keep=n_response + 1, use_cache=False, output_hidden_states=shared)
        logits = out.logits[:, :-1]
        if shared:  # the last hidden state (after the final norm) of the same pass
            values = self.value_head(out.hidden_states[-1][:, -n_response - 1:-1]).squeeze(-1)
        else:
            inner = _unpeft(self.value_model)
            backbone = getattr(inner, inner.base_model_prefix)
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              use_cache=False).last_hidden_state
            values = inner.score(hidden[:, -n_response - 1:-1]).squeeze(-1)
        ptx_loss = None
        if ptx_input_ids is not None:
            ptx_loss = self.policy(input_ids=ptx_input_ids, attention_mask=ptx_attention_mask,
                                   labels=ptx_labels, use_cache=False).loss
        return logits, values, ptx_loss


def _unpeft(model: nn.Module) -> nn.Module:
    """The model a PeftModel wraps (its layers carry the adapters), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def reference_logits(st: "Setup", input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """The frozen reference's logits that predicted the last T tokens. Shape: (b, len) -> (b, T, vocab).

    With LoRA and no separate reference model, the reference is the policy's own weights with the adapters
    disabled: no second copy of the model."""
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
              logits_to_keep=T + 1, use_cache=False)
    if st.reference is not None:
        return st.reference(**kw).logits[:, :-1]
    policy = st.accelerator.unwrap_model(st.model).policy
    with policy.disable_adapter():
        return policy(**kw).logits[:, :-1]


@torch.no_grad()
def sample_answers(policy: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, eos_ids: set[int],
                   pad_id: int, cfg: PPOConfig, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample answers with a KV cache and one seeded generator per row; rows stop at EOS.

    Shape: prompt_ids, prompt_mask (b, p) left-padded -> answers (b, t) (pad after the end), answer_mask (b, t)
    (1 up to and including EOS, then 0), has_eos (b,) bool. t <= max_new_tokens.
    """
    from transformers import DynamicCache


    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    generators = [torch.Generator().manual_seed(s % (2**63)) for s in seeds]
    b, device = prompt_ids.shape[0], prompt_ids.device
    mask, positions, cache = prompt_mask, _positions(prompt_mask), DynamicCache()
    out = policy(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=1)
    last_pos = positions[:, -1:]
    done = torch.zeros(b, dtype=torch.bool)
    has_eos = torch.zeros(b, dtype=torch.bool)
    eos = torch.tensor(sorted(eos_ids))
    tokens, answer_mask = [], []
    for _ in range(cfg.max_new_tokens):
        nxt = sample_next(out.logits[:, -1, :].float().cpu(), sampling, generators)
        answer_mask.append(~done)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        is_eos = torch.isin(nxt, eos) & ~done
        has_eos |= is_eos
        tokens.append(nxt)
        done |= is_eos
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        last_pos = last_pos + 1
        out = policy(input_ids=nxt.view(-1, 1).to(device), attention_mask=mask, position_ids=last_pos,
                     cache=cache, use_cache=True)
    answers = torch.stack(tokens, dim=1).to(device)
    return answers, torch.stack(answer_mask, dim=1).to(device).long(), has_eos.to(device)


def sft_tensors(tokenizer, examples: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Prompt/completion conversations -> (input ids, labels) with labels -100 on the prompt (loss on the answer)."""
    out = []
    for n, ex in enumerate(examples):
        if not isinstance(ex.get("prompt"), list) or not isinstance(ex.get("completion"), list):
            raise CaiError(f"sft_examples[{n}]: expected {{'prompt': [messages], 'completion': [messages]}}, "
                           f"got keys {sorted(ex)}")
        prompt_text = tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise CaiError(f"sft_examples[{n}]: the chat template of prompt+completion does not start with the "
                           "templated prompt, so the answer tokens cannot be told apart")
        p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        c = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        ids, labels = (p + c)[:max_length], ([-100] * len(p) + c)[:max_length]
        if any(x != -100 for x in labels):  # an answer truncated away entirely would give a 0/0 loss
            out.append((ids, labels))
    if not out:
        raise CaiError(f"ptx_coef > 0 but no sft example has answer tokens within ptx_max_length={max_length}")
    return out


def _ptx_batch(data, update: int, size: int, pad_id: int, device):
    """The update-th minibatch of SFT examples, cycling through the list; right-padded. Shape: 3 x (b, len)."""
    rows = [data[(update * size + j) % len(data)] for j in range(size)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in rows], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
    return ids, mask, labels


def _last_checkpoint(root: Path) -> Path | None:
    """The newest complete step-N directory (published by rename after its state file was written)."""
    done = [p for p in root.glob("step-*") if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


def _checked_config(cfg, n_prompts: int) -> PPOConfig:
    """The settings as a validated PPOConfig (Python callers may pass an OmegaConf node of one)."""
    if not is_dataclass(cfg):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(cfg)
    validate(cfg, "ppo.")
    if n_prompts == 0:
        raise CaiError("no prompts to train on")
    return cfg


# --- the loop: setup, then per step a rollout and its updates -------------------------------------------------


@dataclass
class Setup:
    """Everything the steps share: the accelerator, the prepared policy+value module, its optimizer, the frozen
    reference, the tokenizer and the prompts' token ids."""

    accelerator: object
    model: nn.Module  # PolicyAndValue, prepared by accelerate
    optimizer: torch.optim.Optimizer
    reference: nn.Module | None  # None: LoRA, the policy with its adapters disabled
    tokenizer: object
    pad_id: int
    eos_ids: set[int]
    kl_ctl: object
    ptx_data: list | None
    encoded: list[list[int]]  # chat-templated prompt ids
    bf16: bool
    memory: dict = field(default_factory=dict)  # phase -> GiB resident at its end (this step's phases)
    peak: tuple = (0.0, "")  # (the process's peak resident set so far in GiB, the phase in which it was reached)


def mark_phase(st: Setup, phase: str, log: bool = True) -> None:
    """Record the resident set at the end of `phase` (setup, sample, logprobs, score, update; checkpoint and
    publish, which come after a step's metrics, only count for the peak: log=False), and the phase if the
    process's peak rose during it (the peak never falls, so the last phase that raised it is where the run's
    peak was reached)."""
    mem = memory_gib()
    if mem is None:
        return
    if log:
        st.memory[phase] = mem[0]
    if mem[1] > st.peak[0]:
        st.peak = (mem[1], phase)


class Rollout(NamedTuple):
    """One step's rollout, scored, with its per-token rewards and advantages. Shapes: (B, T) unless noted."""

    prompts: list[str]
    input_ids: torch.Tensor  # (B, prompt_len + T)
    attention_mask: torch.Tensor  # (B, prompt_len + T)
    answers: torch.Tensor  # answer token ids
    mask: torch.Tensor  # 1 on answer tokens
    has_eos: torch.Tensor  # (B,)
    texts: list[str]
    raw_scores: torch.Tensor  # (B,) reward_fn's scores
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def setup(policy: ModelRef, cfg: PPOConfig, prompts: list[str], value_init: ModelRef | None,
          sft_examples: list[dict] | None, reference: ModelRef | None) -> Setup:
    """The models (trainable policy, frozen reference = the SL-CAI weights, value model), optimizer, KL
    controller and the prompts' ids."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    probe = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = use_bf16(cfg.bf16, probe.type, name="ppo.bf16")
    # Mixed precision keeps fp32 master weights and autocasts matmuls to bf16: pure-bf16 weights would round
    # away AdamW updates of lr 1e-5, and accelerate does the same thing on CPU (AMX) and GPU.
    # Several stages can run in one process (the pipeline, tests), each with its own precision; accelerate's
    # state is a process-wide singleton, so start it afresh, as transformers' TrainingArguments does.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no")
    if sharded_launch():
        raise CaiError(f"PPO runs alone, under DDP or under DeepSpeed ZeRO-2, not under {sharded_launch()}: "
                       "rollouts and the frozen reference need whole weights on every process")
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed wants a micro-batch size when no dataloader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.mini_batch_size
    set_seed(cfg.seed)
    device = accelerator.device

    tokenizer = load_tokenizer(policy)
    policy_model, ref_model = _policy_and_reference(policy, reference, cfg, device, bf16)
    value_model = value_head = None
    if value_model_kind(cfg) == "shared":
        value_head = nn.Linear(_unpeft(policy_model).config.hidden_size, 1)
        nn.init.zeros_(value_head.weight)  # V = 0 until it learns: GAE starts as plain Monte Carlo
        nn.init.zeros_(value_head.bias)
    else:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected when starting from the policy
        try:
            value_model = AutoModelForSequenceClassification.from_pretrained(
                (value_init or policy).path, num_labels=1, dtype=torch.float32, **safetensors_only())
        finally:
            hf_logging.set_verbosity(verbosity)
        if value_model.config.num_labels != 1:
            raise CaiError(f"value_init={value_init.name}: has {value_model.config.num_labels} labels; expected a "
                           "preference model with one scalar output")
        if value_init is None:
            nn.init.zeros_(value_model.score.weight)  # V = 0 until it learns: GAE starts as plain Monte Carlo
            if value_model.score.bias is not None:
                nn.init.zeros_(value_model.score.bias)
        value_model = with_lora(value_model, cfg.lora, "SEQ_CLS", "ppo.lora")  # LoRA on the PM (or policy copy)
    for m in (policy_model, value_model, ref_model):
        if m is not None:
            _disable_dropout(m)
    if uses_checkpointing(cfg):
        # non-reentrant: LoRA's frozen inputs need no requires_grad hook; only layers run with grad enabled (the
        # update) are checkpointed, so sampling under no_grad keeps its KV cache
        for m in (policy_model, value_model):
            if m is not None:
                _unpeft(m).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    gen_eos = policy_model.generation_config.eos_token_id
    eos_ids = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)

    model = PolicyAndValue(policy_model, value_model, value_head)
    # One AdamW, two param groups: one backward of pg + vf_coef * vf (+ ptx) steps both, with their own lrs.
    # fused: one kernel over all parameters, ~4x faster than the per-tensor loop on CPU (and on GPU).
    value_part = value_head if value_head is not None else value_model
    optimizer = torch.optim.AdamW([
        {"params": [p for p in policy_model.parameters() if p.requires_grad], "lr": cfg.learning_rate},
        {"params": [p for p in value_part.parameters() if p.requires_grad], "lr": cfg.value_learning_rate},
    ], fused=device.type in ("cpu", "cuda"))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.init_kl_coef))
    ptx_data = sft_tensors(tokenizer, sft_examples, cfg.ptx_max_length) if cfg.ptx_coef > 0 else None
    encoded = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                       tokenize=False), add_special_tokens=False)["input_ids"]
               for p in prompts]
    return Setup(accelerator, model, optimizer, ref_model, tokenizer, tokenizer.pad_token_id, eos_ids, kl_ctl,
                 ptx_data, encoded, bf16)


def uses_checkpointing(cfg: PPOConfig) -> bool:
    """`ppo.gradient_checkpointing`, with auto = on under LoRA (the memory-saving setup), off otherwise."""
    setting = str(cfg.gradient_checkpointing).lower()
    return cfg.lora.enabled if setting == "auto" else setting == "true"


def value_model_kind(cfg: PPOConfig) -> str:
    """separate | shared: `ppo.value_model`, with auto = shared under LoRA, separate otherwise."""
    if cfg.value_model != "auto":
        return cfg.value_model
    return "shared" if cfg.lora.enabled else "separate"


def _policy_and_reference(policy: ModelRef, reference: ModelRef | None, cfg: PPOConfig, device, bf16: bool):
    """(trainable policy, frozen reference or None). Without LoRA: two copies of the weights. With LoRA the
    reference is the policy with its adapters disabled (None here), so the adapters must sit on the reference's
    weights: a policy that is the reference gets fresh adapters; a policy published by an earlier LoRA round
    (merged weights + adapter/ trained on the reference) continues its adapter on the reference's weights. Any
    other policy with a different reference falls back to a separate reference copy."""
    from transformers import AutoModelForCausalLM

    def load(ref: ModelRef):
        return AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32, **safetensors_only())

    def frozen(ref: ModelRef):
        model = load(ref).to(device).train(False)
        model.requires_grad_(False)
        if bf16:
            _linears_to_bf16(model)
        return model

    anchor = reference or policy  # the KL anchor: the SL-CAI model, also when later rounds start from an RL policy
    if not cfg.lora.enabled:
        return load(policy), frozen(anchor)
    if anchor.identity == policy.identity:
        return with_lora(load(policy), cfg.lora, "CAUSAL_LM", "ppo.lora"), None
    adapter = Path(policy.path) / ADAPTER_DIR
    if (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if Path(base).resolve() == Path(anchor.path).resolve():
            return PeftModel.from_pretrained(load(anchor), str(adapter), is_trainable=True), None
    return with_lora(load(policy), cfg.lora, "CAUSAL_LM", "ppo.lora"), frozen(anchor)


def rollout(st: Setup, cfg: PPOConfig, reward_fn: RewardFn, batch_prompts: list[str], idx: list[int],
            seeds: list[int]) -> Rollout:
    """Steps 1-4 of a PPO step: sample, score, shape rewards with the KL penalty, estimate advantages."""
    accelerator, device, B = st.accelerator, st.accelerator.device, len(batch_prompts)
    unwrapped = accelerator.unwrap_model(st.model)
    # -- 1. rollout ----------------------------------------------------------------------------------------
    prompt_ids, prompt_mask = _left_pad([st.encoded[i] for i in idx], st.pad_id, device)
    with accelerator.autocast():
        answers, mask, has_eos = sample_answers(unwrapped.policy, prompt_ids, prompt_mask, st.eos_ids, st.pad_id,
                                                cfg, seeds)
    mark_phase(st, "sample")
    T = answers.shape[1]
    input_ids = torch.cat([prompt_ids, answers], dim=1)
    attention_mask = torch.cat([prompt_mask, mask], dim=1)

    # -- 2. log-probs, reference log-probs, values (the "old" policy of this step) -------------------------
    logprobs, ref_logprobs, values, entropy = [], [], [], []
    with torch.no_grad(), accelerator.autocast():
        for s in range(0, B, cfg.mini_batch_size):
            sl = slice(s, s + cfg.mini_batch_size)
            logits, v, _ = st.model(input_ids[sl], attention_mask[sl], T)
            logits = logits.float() / cfg.temperature
            logprobs.append(logprobs_from_logits(logits, answers[sl]))
            entropy.append(entropy_from_logits(logits))
            values.append(v.float())
            ref_logits = reference_logits(st, input_ids[sl], attention_mask[sl], T).float() / cfg.temperature
            ref_logprobs.append(logprobs_from_logits(ref_logits, answers[sl]))
    logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
    values, entropy = torch.cat(values), torch.cat(entropy)
    fmask = mask.float()
    logprobs, ref_logprobs, values = logprobs * fmask, ref_logprobs * fmask, values * fmask
    mark_phase(st, "logprobs")

    # -- 3. scores and KL-shaped per-token rewards ---------------------------------------------------------
    texts = [st.tokenizer.decode(a[m.bool()].tolist(), skip_special_tokens=True) for a, m in zip(answers, mask)]
    raw_scores = torch.tensor([float(x) for x in reward_fn(batch_prompts, texts)], device=device)
    if raw_scores.shape != (B,):
        raise CaiError(f"reward_fn returned {raw_scores.shape[0]} scores for {B} answers; expected one each")
    check_finite("reward_fn scores", raw_scores)
    mark_phase(st, "score")
    scores = apply_missing_eos_penalty(raw_scores, has_eos, cfg.missing_eos_penalty)
    rewards, kl = rewards_with_kl(scores, logprobs, ref_logprobs, mask, st.kl_ctl.value, cfg.kl_estimator)
    if cfg.whiten_rewards and mask.sum() >= 2:  # whitening needs two tokens (a batch of one 1-token answer)
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    # -- 4. advantages -------------------------------------------------------------------------------------
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages and mask.sum() >= 2:
        advantages = masked_whiten(advantages, mask)
    check_finite("advantages", advantages)
    return Rollout(batch_prompts, input_ids, attention_mask, answers, mask, has_eos, texts, raw_scores, logprobs,
                   ref_logprobs, values, entropy, rewards, kl, advantages, returns)


def update(st: Setup, cfg: PPOConfig, ro: Rollout, step: int, first_update: int) -> dict[str, list]:
    """Step 5: ppo_epochs x minibatches of clipped policy loss + vf_coef * clipped value loss (+ ptx)."""
    accelerator, device = st.accelerator, st.accelerator.device
    B, T = ro.answers.shape
    # -- 5. PPO updates -------------------------------------------------------------------------------------
    _release_freed_memory()  # the rollout's and last step's freed buffers: else they add to the backward's peak
    stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "ptx_loss",
                             "grad_norm")}
    order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    update_i = first_update
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=order_gen).to(device)
        for s in range(0, B, cfg.mini_batch_size):
            mb = order[s:s + cfg.mini_batch_size]
            ptx = (_ptx_batch(st.ptx_data, update_i, cfg.mini_batch_size, st.pad_id, device) if st.ptx_data
                   else (None,) * 3)
            with accelerator.autocast():
                logits, new_values, ptx_loss = st.model(ro.input_ids[mb], ro.attention_mask[mb], T, *ptx)
            new_logprobs = logprobs_from_logits(logits.float() / cfg.temperature, ro.answers[mb])
            pg_loss, clipfrac, approx_kl = ppo_policy_loss(new_logprobs, ro.logprobs[mb], ro.advantages[mb],
                                                           ro.mask[mb], cfg.clip_range)
            vf_loss, vf_clipfrac = ppo_value_loss(new_values.float(), ro.values[mb], ro.returns[mb], ro.mask[mb],
                                                  cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            check_finite("policy loss", pg_loss)
            check_finite("value loss", vf_loss)
            if ptx_loss is not None:
                check_finite("ptx loss", ptx_loss)
                loss = loss + cfg.ptx_coef * ptx_loss
                stats["ptx_loss"].append(ptx_loss.detach())
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(st.model.parameters(), cfg.max_grad_norm)
            if grad_norm is not None:  # None under DeepSpeed, whose engine clips inside backward
                check_finite("gradient norm", grad_norm)
                stats["grad_norm"].append(torch.as_tensor(grad_norm).detach().float())
            st.optimizer.step()
            st.optimizer.zero_grad()
            bad = first_non_finite(st.model.named_parameters())  # a finite gradient times a huge step
            if bad:
                raise FloatingPointError(f"weight {bad} is not finite after update {update_i + 1}")
            update_i += 1
            for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clipfrac", clipfrac),
                         ("value_clipfrac", vf_clipfrac), ("approx_kl", approx_kl)):
                stats[k].append(torch.as_tensor(v).detach().float())
    _release_freed_memory()  # the backward's activations and gradients: else the next step holds them throughout
    return stats


def save_checkpoint(st: Setup, cfg: PPOConfig, ckpt_root: Path, step: int, history: dict) -> Path:
    """accelerate's state + ppo_state.json in step-N.tmp, renamed to step-N; older checkpoints removed."""
    accelerator = st.accelerator
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        state = {"step": step, "kl_coef": st.kl_ctl.value, "history": history, "config": _config_record(cfg)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in ckpt_root.glob("step-*"):  # keep only the newest complete checkpoint
            if old != final and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    _release_freed_memory()
    return final


def step_metrics(st: Setup, cfg: PPOConfig, ro: Rollout, stats: dict[str, list], started: float) -> dict:
    """Namespaced metrics of one step, averaged over processes."""
    B = len(ro.prompts)
    fmask = ro.mask.float()
    local = {
        "reward_mean": ro.rewards.sum(1).mean(), "score_mean": ro.raw_scores.mean(),
        "kl": ro.kl.sum(1).mean(), "entropy": masked_mean(ro.entropy, ro.mask), "answer_length": fmask.sum(1).mean(),
        "missing_eos_rate": (~ro.has_eos).float().mean(), "value_mean": masked_mean(ro.values, ro.mask),
        **{k: torch.stack(v).mean() for k, v in stats.items() if v},
    }
    keys = list(local)
    reduced = st.accelerator.reduce(torch.stack([local[k].float() for k in keys]), reduction="mean")
    logged = {f"rl/ppo/{k}": float(v) for k, v in zip(keys, reduced)}
    logged["rl/ppo/reward_std"] = float(ro.rewards.sum(1).std()) if B > 1 else 0.0
    logged["rl/ppo/kl_coef"] = st.kl_ctl.value
    logged["rl/ppo/seconds"] = round(time.time() - started, 2)
    for phase, gib in st.memory.items():  # this process's resident set at the end of each phase so far
        logged[f"rl/ppo/rss_gib/{phase}"] = round(gib, 3)
    if st.peak[1]:
        logged["rl/ppo/peak_rss_gib"] = round(st.peak[0], 3)
    # a policy that wins the PM by repeating itself shows here (this process's answers; cai.measures)
    deg = degeneration(ro.texts)
    logged["rl/ppo/repetition_share"] = deg["repetition_share"]
    logged["rl/ppo/distinct_2"] = deg["distinct_2"]
    return logged


def value_init_for(setting: str, pm_dir: Path) -> ModelRef | None:
    """The value model's start for `ppo.value_init`: the PM directory (pm), or None (policy: a zero head)."""
    return resolve_model(str(pm_dir)) if setting == "pm" else None


def run_ppo(policy: ModelRef, reward_fn: RewardFn, prompts: list[str], cfg: PPOConfig, out_dir: Path, metrics,
            value_init: ModelRef | None = None, sft_examples: list[dict] | None = None, progress: bool = True,
            reference: ModelRef | None = None) -> dict:
    """Train `policy` by PPO on `reward_fn` scores of its answers to `prompts`; save it to out_dir/policy/.

    reward_fn(prompts, answers) -> one float per answer (answers decoded without special tokens).
    value_init: the PM directory (a sequence-classification model with one label) whose backbone and `score`
    head become the per-token value model, as InstructGPT initialises the value model from the RM; None
    starts from the policy's backbone with a zero head. sft_examples: prompt/completion conversations for
    the ptx loss (needed when ptx_coef > 0). reference: the frozen KL anchor (default: the policy's own starting
    weights; online rounds pass the SL-CAI model). Returns a summary dict (also written as policy/cai_train.json).
    """
    from tqdm import tqdm

    cfg = _checked_config(cfg, len(prompts))
    if cfg.ptx_coef > 0 and not sft_examples:
        raise CaiError("ppo.ptx_coef > 0 needs sft_examples (prompt/completion conversations); got none")
    configure_cpu_threads()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    start_time = time.time()
    st = setup(policy, cfg, prompts, value_init, sft_examples, reference)
    accelerator = st.accelerator
    mark_phase(st, "setup")

    # -- resume ----------------------------------------------------------------------------------------------
    start, history, resumed_from = 0, {"reward_mean": [], "kl": []}, None
    if accelerator.is_main_process and ckpt_root.exists():
        for stale in ckpt_root.glob("*.tmp"):  # a save killed halfway
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    last = _last_checkpoint(ckpt_root) if ckpt_root.exists() else None
    if last is not None:
        accelerator.load_state(str(last))
        state = json.loads((last / STATE_FILE).read_text())
        start, history, st.kl_ctl.value = state["step"], state["history"], state["kl_coef"]
        resumed_from = str(last)
        if start > cfg.steps:
            raise CaiError(f"{last}: this run is already at step {start}, past ppo.steps={cfg.steps}; "
                           f"set ppo.steps >= {start} to continue it, or use a fresh output directory")

    # -- prompts: a seeded permutation per pass over the prompt list; each process takes its own slice ------
    perms: dict[int, list[int]] = {}

    def prompt_index(global_row: int) -> int:
        epoch, pos = divmod(global_row, len(prompts))
        if epoch not in perms:
            shuffle = torch.Generator().manual_seed(cfg.seed + epoch)
            perms[epoch] = torch.randperm(len(prompts), generator=shuffle).tolist()
        return perms[epoch][pos]

    world, rank, B = accelerator.num_processes, accelerator.process_index, cfg.rollout_batch_size
    updates_per_step = cfg.ppo_epochs * -(-B // cfg.mini_batch_size)
    bar = tqdm(total=cfg.steps, initial=start, desc="ppo", unit="step",
               disable=not progress or not accelerator.is_main_process)
    last_good = resumed_from
    for step in range(start + 1, cfg.steps + 1):
        rows = [(step - 1) * B * world + rank * B + k for k in range(B)]
        idx = [prompt_index(r) for r in rows]
        try:
            ro = rollout(st, cfg, reward_fn, [prompts[i] for i in idx], idx,
                         [_row_seed(cfg.seed, step, r) for r in rows])
            stats = update(st, cfg, ro, step, (step - 1) * updates_per_step)
            mark_phase(st, "update")
        except FloatingPointError as e:
            bar.close()
            where = f"last good checkpoint: {last_good} (rerun to resume from it)" if last_good else "no checkpoint yet"
            raise NonFiniteError(f"PPO step {step}: {e}; stopped before saving it, no policy was published; "
                                 f"{where}") from e

        # -- metrics (averaged over processes) --------------------------------------------------------------
        logged = step_metrics(st, cfg, ro, stats, start_time)
        if cfg.sample_every and step % cfg.sample_every == 0:
            logged["rl/ppo/samples"] = [{"prompt": p, "answer": a, "score": float(sc)}
                                        for p, a, sc in list(zip(ro.prompts, ro.texts, ro.raw_scores))[:4]]
            if progress and accelerator.is_main_process:
                tqdm.write("\n".join(f"[step {step}] score={row['score']:+.3f}  {row['prompt'][:40]!r} -> "
                                     f"{row['answer'][:80]!r}" for row in logged["rl/ppo/samples"]))
        if accelerator.is_main_process:
            metrics.log(logged, step=step)
        st.memory.clear()
        history["reward_mean"].append(logged["rl/ppo/reward_mean"])
        history["kl"].append(logged["rl/ppo/kl"])
        history.setdefault("rollout_tokens", []).append(int(ro.mask.sum()) * world)  # cai.compare's compute cost
        # the controller sees this step's KL after its updates (Ziegler et al. 2019; TRL)
        st.kl_ctl.update(logged["rl/ppo/kl"], B * world)
        bar.update()
        bar.set_postfix(reward=f"{logged['rl/ppo/reward_mean']:.3f}", kl=f"{logged['rl/ppo/kl']:.3f}")

        if step % cfg.save_every == 0 or step == cfg.steps:
            last_good = str(save_checkpoint(st, cfg, ckpt_root, step, history))
            mark_phase(st, "checkpoint", log=False)
    bar.close()

    # -- the trained policy: safetensors + tokenizer + summary, published by rename ---------------------------
    seconds = time.time() - start_time
    summary = {"policy": policy.identity, "value_init": value_init.identity if value_init else None,
               "steps": cfg.steps, "steps_run": cfg.steps - start, "prompts": len(prompts),
               "first_reward_mean": history["reward_mean"][0] if history["reward_mean"] else None,
               "last_reward_mean": history["reward_mean"][-1] if history["reward_mean"] else None,
               "last_kl": history["kl"][-1] if history["kl"] else None, "kl_coef": st.kl_ctl.value,
               "rollout_tokens": sum(history.get("rollout_tokens", [])),
               "bf16": st.bf16, "lora": cfg.lora.enabled, "value_model": value_model_kind(cfg),
               "gradient_checkpointing": uses_checkpointing(cfg),
               "shared_reference": st.reference is None, "seconds": round(seconds, 1), "resumed_from": resumed_from, "config": _config_record(cfg),
               # this process's peak resident set and the phase that reached it (the file: through training;
               # the returned summary: publishing included)
               "peak_rss_gib": round(st.peak[0], 3) if st.peak[1] else None, "peak_rss_phase": st.peak[1] or None}
    trained = accelerator.unwrap_model(st.model).policy
    # gathers shards under DeepSpeed ZeRO-2; a LoRA policy is saved merged + its adapter
    state_dict = None if is_lora(trained) else accelerator.get_state_dict(st.model)
    if accelerator.is_main_process:
        tmp = out_dir / "policy.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        policy_state = None if state_dict is None else \
            {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        save_pretrained_merged(trained, tmp, policy_state)
        st.tokenizer.save_pretrained(tmp)
        write_atomic(tmp / TRAIN_INFO, json.dumps(summary, indent=1))
        swap_into_place(tmp, out_dir / "policy")
        metrics.log({"rl/ppo/train_seconds": seconds, "rl/ppo/steps_run": cfg.steps - start}, step=cfg.steps)
    accelerator.wait_for_everyone()
    mark_phase(st, "publish", log=False)
    if st.peak[1]:
        summary.update(peak_rss_gib=round(st.peak[0], 3), peak_rss_phase=st.peak[1])
    return summary
