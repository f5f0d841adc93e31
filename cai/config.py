"""Every config schema, and how a config is loaded and checked. Torch-free.

`load_config(argv)`: dataclass schema <- pipelines/<stage>.yaml <- key=value overrides (OmegaConf), then
`OmegaConf.to_object` gives real dataclasses, and `validate` checks every value (ranges, finiteness, choices,
files that must exist, and the rules that tie settings together) before any stage starts: a typo fails in
well under a second with one line that names the setting, not after an hour of sampling.

Every field has a type, a default and one line of help (`F(default, help, ...)`), plus the constraints its
value must meet (`ge`, `gt`, `le`, `lt`, `choices`, `file`). Unknown keys fail with a close-match
suggestion; a value of the wrong type fails naming the key and where it came from. A dataclass built directly
in Python (`PPOConfig(learning_rate=-1)`) is checked the same way by its `__post_init__`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import math
import re
import urllib.parse
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cai.errors import CaiError
from cai.io import load_yaml_mapping, read_yaml  # noqa: F401 - read_yaml is part of this module's API
from cai.paths import resolve_path
from cai.records import stable_hash  # noqa: F401 - re-exported: older callers import it from here


def F(default, help: str, **check):  # noqa: A002 - a field with help text and the constraints on its value
    """A dataclass field: default, one line of help, and checks (ge, gt, le, lt, choices, file, name)."""
    meta = {"help": help, **check}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda d=default: type(d)(**vars(d)) if is_dataclass(d) else type(d)(d),
                     metadata=meta)
    return field(default=default, metadata=meta)


# --- checking values ---------------------------------------------------------------------------------------

_deferred = contextvars.ContextVar("cai_config_deferred", default=False)
_BOOL_WORDS = ("auto", "true", "false")
_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def _show(value: Any) -> str:
    return str(value) if not isinstance(value, str) or value else "''"


def _check_value(path: str, value: Any, meta: dict, files: bool = True) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise CaiError(f"{path}={value}: expected a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for op, ok, _word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                             ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if op in meta and not ok(value, meta[op]):
                bounds = " and ".join(f"{w} {meta[o]}" for o, w in (("ge", ">="), ("gt", ">"), ("le", "<="),
                                                                      ("lt", "<")) if o in meta)
                raise CaiError(f"{path}={value}: expected a number {bounds}")
    choices = meta.get("choices")
    if choices is not None:
        v = str(value).lower() if choices == _BOOL_WORDS else value
        if v not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]}?)" if close and close[0] != str(value) else ""
            raise CaiError(f"{path}={_show(value)}: expected one of {', '.join(map(str, choices))}{hint}")
    if files and meta.get("file") and isinstance(value, str) and value and not value.startswith("hf:"):
        if not resolve_path(value).exists():
            raise CaiError(f"{path}={value}: no such file")
    if meta.get("name") and not _RUN_NAME.match(str(value)):
        raise CaiError(f"{path}={_show(value)}: expected a plain name (letters, digits, -, _, .)")
    if meta.get("device") and not _DEVICE.match(str(value)):
        raise CaiError(f"{path}={value}: expected auto, cpu, cuda or cuda:N")


def validate(cfg: Any, prefix: str = "", files: bool = True) -> Any:
    """Check every field of a config dataclass and of its sections (depth first); errors name the dotted key.
    files=False skips the files-must-exist checks (a Python caller's loader reports a missing file itself)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if is_dataclass(value):
            validate(value, f"{path}.", files)
        else:
            _check_value(path, value, f.metadata, files)
    rules = getattr(cfg, "rules", None)
    if rules is not None:
        rules(prefix)
    return cfg


class Checked:
    """Base of every schema: a dataclass built in Python is validated on construction; the loader defers that
    to one `validate` of the whole config, so errors carry the full dotted key (`ppo.learning_rate`)."""

    def __post_init__(self) -> None:
        if not _deferred.get():
            validate(self, files=False)


# --- sections shared by several stages ---------------------------------------------------------------------

BACKENDS = ("transformers", "vllm", "openai", "fake")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelConfig(Checked):
    model: str = F("smollm2-135m", "preset (smollm2-135m, tiny), local model dir, or hub id (online only)")
    backend: str = F("transformers", "transformers | vllm (GPU, the vllm extra) | openai (an OpenAI-compatible "
                                     "server) | fake (control-flow tests)", choices=BACKENDS)
    dtype: str = F("auto", "auto (bf16 where the CPU/GPU has it; else fp32, decoding from fp16 weight copies on "
                           "CPUs where fbgemm runs) | float32 | bfloat16 | float16", choices=DTYPES)
    device: str = F("auto", "auto | cpu | cuda | cuda:N", device=True)
    batch_size: int = F(16, "requests per forward batch (length-bucketed)", ge=1)
    trust_remote_code: bool = F(False, "allow model repos to run their own Python code (off unless you trust it)")
    base_url: str = F("", "backend=openai: server address, e.g. http://127.0.0.1:8000 (model = served model name)")
    api_key_env: str = F("OPENAI_API_KEY", "backend=openai: environment variable holding the API key (never saved)")
    tokenizer: str = F("", "backend=openai: local model dir or preset with the served model's chat template "
                           "(needed for option scoring)")
    concurrency: int = F(8, "backend=openai: requests in flight at most", ge=1)
    gpu_memory_utilization: float = F(0.85, "backend=vllm: share of the GPU's memory vLLM may take (weights + KV "
                                            "cache)", gt=0, le=1)
    max_model_len: int = F(0, "backend=vllm: tokens of context to reserve KV cache for (0 = the model's own limit)",
                           ge=0)
    enable_prefix_caching: bool = F(True, "backend=vllm: reuse the KV cache of shared prompt prefixes (few-shot, "
                                          "templates)")
    tensor_parallel_size: int = F(1, "backend=vllm: GPUs one copy of the model is split across", ge=1)

    def rules(self, prefix: str) -> None:
        if not str(self.model).strip():
            raise CaiError(f"{prefix}model: expected a preset, a model directory or a hub id, got ''")
        check_endpoint(self.base_url, self.api_key_env, prefix)


_KEY_VAR = re.compile(r"^[A-Z][A-Z0-9_]*_API_(KEY|TOKEN)$")


def check_endpoint(base_url: str, api_key_env: str, prefix: str = "") -> None:
    """An endpoint is http(s) with no credentials in it, and the key comes from a variable named like an API key
    (`*_API_KEY`, `*_API_TOKEN`): a config cannot make the client read, say, AWS_SECRET_ACCESS_KEY and send it."""
    if not _KEY_VAR.match(str(api_key_env)):
        raise CaiError(f"{prefix}api_key_env={api_key_env}: expected the name of an API key variable (capitals, "
                       "ending in _API_KEY or _API_TOKEN)")
    if base_url:
        u = urllib.parse.urlsplit(str(base_url))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise CaiError(f"{prefix}base_url={base_url}: expected http(s)://host[:port][/path]")
        if u.username or u.password:
            raise CaiError(f"{prefix}base_url: credentials in the URL are refused; put the key in the variable "
                           f"{prefix}api_key_env names")


@dataclass(frozen=True)
class SamplingConfig(Checked):
    max_new_tokens: int = F(128, "tokens generated at most per answer, critique or revision", ge=1)
    temperature: float = F(0.7, "softmax temperature; 0 = greedy", ge=0)
    top_p: float = F(0.9, "nucleus sampling mass", gt=0, le=1)
    top_k: int = F(0, "top-k cut-off; 0 = off", ge=0)


@dataclass(frozen=True)
class PromptSource(Checked):
    path: str = F("", "JSONL/JSON/CSV/Parquet file, or hf:NAME for a hub dataset (online only)", file=True)
    column: str = F("prompt", "column holding the prompt text")
    id_column: str = F("id", "column holding a stable id (row number when absent)")
    category_column: str = F("category", "column holding a category (optional)")
    split: str = F("train", "split, for hub datasets")
    limit: Optional[int] = F(None, "use only the first N prompts", ge=0)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class LoRAConfig(Checked):
    """LoRA (PEFT) adapters instead of full-parameter training. Off by default: at 135M parameters full training
    fits in a few GB on a CPU (full PPO with the shared value head: BENCHMARKS.md), so LoRA's gain, memory, is not
    needed there, and full training updates every weight; turn it on for bigger models or a memory budget (PPO with
    LoRA keeps one copy of the weights: the reference is the same weights with the adapters disabled)."""

    enabled: bool = F(False, "train LoRA adapters instead of every weight (off at 135M: full training fits in a few "
                             "GB there and updates every weight; on for bigger models or less memory, "
                             "BENCHMARKS.md). LoRA usually wants ~10x the full-training learning rate")
    r: int = F(16, "adapter rank", gt=0)
    alpha: float = F(32.0, "scaling numerator: the update is (alpha / r) * B @ A", gt=0)
    dropout: float = F(0.05, "dropout on the adapters' input while training", ge=0, lt=1)
    target_modules: list = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "module names (name suffixes) that get adapters, or [all-linear]; the default is every attention "
                "and MLP projection of a Llama-style model"})

    def rules(self, prefix: str) -> None:
        if not isinstance(self.target_modules, (list, tuple)) or not self.target_modules:
            raise CaiError(f"{prefix}target_modules={self.target_modules!r}: expected a non-empty list of module "
                           "names, e.g. [q_proj,v_proj] or [all-linear]")
        for i, name in enumerate(self.target_modules):
            if not isinstance(name, str) or not (_MODULE_NAME.match(name) or name == "all-linear"):
                raise CaiError(f"{prefix}target_modules[{i}]={name!r}: expected a module name such as q_proj, "
                               "or all-linear")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise CaiError(f"{prefix}target_modules: all-linear stands alone; expected [all-linear] or a list of "
                           "names")


def _lora_field():
    return F(LoRAConfig(), "LoRA adapters (PEFT) instead of full-parameter training")


# --- stage=sl ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CritiqueConfig(Checked):
    rounds: int = F(4, "critique->revision rounds per red-team prompt (the paper uses 4)", ge=0)
    few_shot: int = F(2, "few-shot demonstrations prepended to each critique and revision request (0 allowed)", ge=0)
    few_shot_file: str = F("prompts/few_shot/critique_revision.yaml", "critique/revision demonstrations", file=True)
    critique_template: str = F("prompts/templates/critique.txt", "template of the critique request", file=True)
    revision_template: str = F("prompts/templates/revision.txt", "template of the revision request", file=True)


SFT_SOURCES = ("human", "revision", "contrast", "helpful", "initial")


@dataclass(frozen=True)
class CRLFTConfig(Checked):
    rewards: dict = F({"human": 1.0, "revision": 0.8, "contrast": 0.6, "helpful": 0.5, "initial": 0.1},
                      "coarse reward per SFT source (human demonstrations, revision, contrast, helpful answers, "
                      "initial answers); it weights the source's loss; 0 leaves the source out")
    normalize: bool = F(True, "scale the weights so their mean over the training examples is 1 (the learning rate "
                              "means what it means for plain SFT); false: the rewards are the weights (OpenChat)")
    condition_template: str = F("prompts/templates/crlft_condition.txt", "the condition put at the start of the "
                                                                         "system turn; its slot {{source}} is the "
                                                                         "source's name", file=True)
    generate_with: str = F("", "the source whose condition the trained model answers under ('' = the source with "
                               "the highest reward among those in the data); stored in the model's chat template",
                           choices=("",) + SFT_SOURCES)

    def rules(self, prefix: str) -> None:
        for name, reward in self.rewards.items():
            if name not in SFT_SOURCES:
                close = difflib.get_close_matches(str(name), SFT_SOURCES, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise CaiError(f"{prefix}rewards.{name}: no such SFT source; expected one of "
                               f"{', '.join(SFT_SOURCES)}{hint}")
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward) \
                    or reward < 0:
                raise CaiError(f"{prefix}rewards.{name}={reward}: expected a finite number >= 0")
        if not any(r > 0 for r in self.rewards.values()):
            raise CaiError(f"{prefix}rewards: every reward is 0; expected at least one source with a reward > 0")
        if self.generate_with and self.rewards.get(self.generate_with, 0) <= 0:
            raise CaiError(f"{prefix}generate_with={self.generate_with}: that source has no reward > 0 in "
                           f"{prefix}rewards, so it is not trained on")


@dataclass(frozen=True)
class SFTConfig(Checked):
    method: str = F("sft", "sft: plain SFT on the mix | crlft: C-RLFT (OpenChat, Wang et al. 2023): each example's "
                           "source is a condition in its prompt and its reward weights its loss; the model answers "
                           "under the best source's condition", choices=("sft", "crlft"))
    crlft: CRLFTConfig = F(CRLFTConfig(), "method=crlft: rewards per source and the condition")
    data: str = F("final", "final: train on the last revision | all: one example per revision round (as the paper) "
                           "| contrast: the answer under the positive contrast context instead (context "
                           "distillation) | final+contrast: both", choices=("final", "all", "contrast", "final+contrast"))
    contrast_context: str = F("prompts/contrast/harmless.yaml", "data=contrast: the context file (its positive side: "
                                                                "system line, openers, few-shot)", file=True)
    contrast_shots: int = F(0, "data=contrast: few-shot turns of the context file put before the prompt", ge=0)
    helpful_ratio: float = F(1.0, "helpful-prompt examples per red-team example in the SFT mix (at most the "
                                  "helpful set's size; the summary says when it caps the ratio)", ge=0)
    epochs: float = F(1.0, "passes over the SFT data", gt=0)
    learning_rate: float = F(5e-5, "AdamW learning rate", gt=0)
    batch_size: int = F(8, "examples per device step", ge=1)
    grad_accum: int = F(1, "gradient accumulation steps", ge=1)
    max_length: int = F(512, "tokens per example at most (longer ones are truncated)", ge=1)
    warmup_ratio: float = F(0.05, "share of steps spent warming up the learning rate", ge=0, le=1)
    bf16: str = F("auto", "auto (where the hardware has it) | true | false", choices=_BOOL_WORDS)
    gradient_checkpointing: bool = F(False, "trade compute for memory (off: faster on CPU at this size)")
    save_steps: int = F(50, "checkpoint every N optimizer steps (a killed run resumes from the last one)", ge=1)
    lora: LoRAConfig = _lora_field()


@dataclass(frozen=True)
class SLConfig(Checked):
    stage: str = F("sl", "which stage this config is for")
    run: str = F("default", "run name: outputs go to <runs_dir>/<run>/", name=True)
    runs_dir: str = F("runs", "where run directories live")
    seed: int = F(0, "seed for principle sampling and generation")
    constitution: str = F("constitutions/default.yaml", "constitution file", file=True)
    generator: ModelConfig = F(ModelConfig(), "the helpful-only starting model: answers, critiques, revises")
    sampling: SamplingConfig = F(SamplingConfig(), "sampling for answers, critiques and revisions")
    red_team: PromptSource = F(PromptSource(path="prompts/sets/red_team_train.jsonl"), "red-team prompts")
    helpful: PromptSource = F(PromptSource(path="prompts/sets/helpful_train.jsonl"), "helpful prompts for the SFT mix")
    critique: CritiqueConfig = F(CritiqueConfig(), "critique/revision settings")
    sft: SFTConfig = F(SFTConfig(), "supervised fine-tuning of the SL-CAI model")
    shard: str = F("", "i/n: generate only shard i of n of the prompts (processes or nodes); a run without shard= "
                       "merges the shards' records (keys make the merge exact), then builds the data and trains")
    source: str = F("revisions", "SFT data: revisions (AI critique/revision) | human (demonstrations) | both",
                    choices=("revisions", "human", "both"))
    human_demonstrations: str = F("", "JSONL/CSV of human-written answers (prompt, answer, annotator) for "
                                      "source=human|both", file=True)
    train: bool = F(True, "run SFT after generating the data (false: data only)")
    report_to: str = F("none", "none | tensorboard (metrics also go to <run>/tensorboard/)",
                       choices=("none", "tensorboard"))
    progress: bool = F(True, "show progress bars")

    def rules(self, prefix: str) -> None:
        parse_shard(self.shard)


def parse_shard(spec: str) -> tuple[int, int] | None:
    """`i/n` -> (i, n); '' -> None."""
    if not spec:
        return None
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise CaiError(f"shard={spec}: expected i/n, e.g. shard=0/4") from None
    if n < 1 or not 0 <= i < n:
        raise CaiError(f"shard={spec}: expected 0 <= i < n")
    return i, n


# --- stage=rl and stage=dpo: the trainers' settings --------------------------------------------------------


@dataclass(frozen=True)
class PMConfig(Checked):
    epochs: float = F(1.0, "passes over the training comparisons", gt=0)
    learning_rate: float = F(1e-5, "AdamW learning rate", gt=0)
    batch_size: int = F(8, "comparisons per device step (the model sees twice as many sequences)", ge=1)
    grad_accum: int = F(1, "gradient accumulation steps", ge=1)
    max_length: int = F(512, "tokens per conversation at most; TRL drops comparisons with a longer side", ge=1)
    warmup_ratio: float = F(0.05, "share of steps spent warming up the learning rate", ge=0, le=1)
    bf16: str = F("auto", "auto (where the hardware has it) | true | false", choices=_BOOL_WORDS)
    gradient_checkpointing: bool = F(False, "trade compute for memory (off: faster on CPU at this size)")
    save_steps: int = F(50, "checkpoint every N optimizer steps (a killed run resumes from the last one)", ge=1)
    eval_fraction: float = F(0.1, "share of comparisons held out for evaluation, chosen by hashing each key",
                             ge=0, lt=1)
    center_rewards_coefficient: Optional[float] = F(None, "weight of mean((r_chosen + r_rejected)^2), pulls rewards "
                                                          "toward 0 (TRL; 0.01 recommended); null = off", ge=0)
    clear_pairs: str = F("prompts/sets/labeled_pairs.jsonl", "pairs with a known better answer (id, category, "
                                                             "prompt, better, worse) the trained PM is checked on; "
                                                             "pairs whose prompt it trained on are left out; '' = off",
                         file=True)
    length_correction: bool = F(True, "after training, fit the reward's linear trend in answer tokens on the "
                                      "training answers and subtract it from every reward the PM gives (PPO, "
                                      "checks, cai.compare): a PM that learned 'longer is better' from its pairs "
                                      "then ranks by what the answers say")
    lora: LoRAConfig = _lora_field()


@dataclass(frozen=True)
class PPOConfig(Checked):
    steps: int = F(20, "PPO iterations (one rollout + its updates each)", ge=1)
    rollout_batch_size: int = F(8, "prompts sampled per rollout, per process", ge=1)
    mini_batch_size: int = F(4, "rollouts per optimizer update", ge=1)
    ppo_epochs: int = F(2, "passes over each rollout batch", ge=1)
    learning_rate: float = F(1e-5, "AdamW learning rate of the policy", gt=0)
    value_learning_rate: float = F(1e-5, "AdamW learning rate of the value model (its own param group)", gt=0)
    max_new_tokens: int = F(32, "tokens sampled at most per answer", ge=1)
    temperature: float = F(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature", gt=0)
    top_p: float = F(1.0, "nucleus sampling mass (1 = off; < 1 makes the sampler differ from the trained policy)",
                     gt=0, le=1)
    init_kl_coef: float = F(0.05, "beta: weight of the per-token KL penalty to the reference model", ge=0)
    adaptive_kl: bool = F(False, "adapt beta so the KL tracks kl_target (Ziegler et al. 2019)")
    kl_target: float = F(6.0, "target KL (nats per answer) for the adaptive controller", gt=0)
    kl_horizon: int = F(10000, "horizon (in rollouts) of the adaptive controller", ge=1)
    kl_estimator: str = F("k1", "per-token KL estimator: k1 | k3 | mse | abs (http://joschu.net/blog/kl-approx.html)",
                          choices=("k1", "k3", "mse", "abs"))
    gamma: float = F(1.0, "discount over answer tokens", ge=0, le=1)
    lam: float = F(0.95, "GAE lambda", ge=0, le=1)
    clip_range: float = F(0.2, "PPO ratio clip epsilon", gt=0)
    clip_range_value: float = F(0.2, "value clip epsilon", gt=0)
    vf_coef: float = F(0.1, "weight of the value loss", ge=0)
    value_init: str = F("policy", "policy: the policy's backbone with a zero value head (V = 0 at first, so the "
                                  "first advantages are the answers' own returns) | pm: the PM's backbone and head "
                                  "(InstructGPT). policy is the default: the PM head was trained at the last token "
                                  "only, and read at every answer token its values only partly follow the returns "
                                  "(docs/ARCHITECTURE.md, value model)", choices=("pm", "policy"))
    value_model: str = F("auto", "separate: a value model of its own (a second backbone + head, initialised by "
                                 "value_init; LoRA adapters on it under lora) | shared: a zero-initialised head on "
                                 "the policy's last hidden state (one forward pass, no second backbone: ~2 GB less "
                                 "at 135M; the value loss also trains the policy's weights, scaled by vf_coef, as "
                                 "TRL's original PPO) | auto: shared with lora, separate without",
                         choices=("auto", "separate", "shared"))
    whiten_advantages: bool = F(True, "normalize advantages over the rollout batch")
    whiten_rewards: bool = F(False, "scale per-token rewards to unit variance before GAE")
    missing_eos_penalty: Optional[float] = F(None, "subtracted from the score of an answer cut off without EOS")
    ptx_coef: float = F(0.0, "PPO-ptx: weight of the SFT loss on sft_examples mixed into each update (0 = off)", ge=0)
    ptx_data: str = F("", "PPO-ptx data: an SFT JSONL (prompt/completion); '' = the SL-CAI data of the run the "
                          "policy comes from (<run>/sl/sft.jsonl)", file=True)
    ptx_max_length: int = F(512, "tokens per SFT example at most for the ptx loss (longer ones are truncated)", ge=1)
    max_grad_norm: float = F(1.0, "gradient clipping norm over policy + value parameters", gt=0)
    gradient_checkpointing: str = F("auto", "recompute each layer's activations in the update's backward instead "
                                            "of keeping them: less memory (LoRA PPO on the bundled model: 2.3 instead "
                                            "of 3.1 GB peak), ~7% more time, the same model (not part of the "
                                            "training key); sampling keeps its KV cache | auto: on with lora (the "
                                            "memory-saving setup), off without | true | false",
                                    choices=_BOOL_WORDS)
    sample_every: int = F(5, "log a table of sample answers every N steps (0 = never)", ge=0)
    save_every: int = F(10, "checkpoint every N steps (and at the end)", ge=1)
    bf16: str = F("auto", "auto (where the hardware has it) | true | false; mixed precision over fp32 weights",
                  choices=_BOOL_WORDS)
    seed: int = F(0, "seed for prompt order, sampling and minibatch order")
    lora: LoRAConfig = _lora_field()


@dataclass(frozen=True)
class GroupRLConfig(Checked):
    num_generations: int = F(4, "answers sampled per prompt (the group that forms the baseline)", ge=2)
    max_completion_length: int = F(32, "tokens per answer at most", ge=1)
    temperature: float = F(1.0, "sampling temperature", gt=0)
    beta: float = F(0.05, "KL coefficient to the reference model (the SL-CAI model in every round)", ge=0)
    epochs: float = F(1.0, "passes over the prompts", gt=0)
    learning_rate: float = F(1e-5, "AdamW learning rate", gt=0)
    batch_size: int = F(8, "answers per device step (a multiple of num_generations)", ge=1)
    grad_accum: int = F(1, "gradient accumulation steps", ge=1)
    warmup_ratio: float = F(0.0, "share of steps spent warming up the learning rate", ge=0, le=1)
    bf16: str = F("auto", "auto | true | false", choices=_BOOL_WORDS)
    gradient_checkpointing: bool = F(False, "trade compute for memory")
    save_steps: int = F(50, "checkpoint every N optimizer steps", ge=1)
    use_vllm: bool = F(False, "generate with vLLM inside each training process (TRL's vllm_mode=colocate; GPU "
                              "only, the vllm extra)")
    vllm_gpu_memory_utilization: float = F(0.3, "use_vllm: share of each GPU's memory vLLM may take (the rest is "
                                                "for training)", gt=0, le=1)
    lora: LoRAConfig = _lora_field()

    def rules(self, prefix: str) -> None:
        if self.batch_size % self.num_generations:
            raise CaiError(f"{prefix}batch_size={self.batch_size}: expected a multiple of "
                           f"{prefix}num_generations={self.num_generations}")


@dataclass(frozen=True)
class DPOConfig(Checked):
    beta: float = F(0.1, "strength of the implicit KL to the reference model", gt=0)
    loss_type: str = F("sigmoid", "TRL DPO loss: sigmoid (DPO) | ipo | hinge | robust ...")
    margin: float = F(0.1, "drop pairs whose soft label is within this distance of 0.5", ge=0, lt=0.5)
    epochs: float = F(1.0, "passes over the preference pairs", gt=0)
    learning_rate: float = F(5e-6, "AdamW learning rate", gt=0)
    batch_size: int = F(4, "pairs per device step", ge=1)
    grad_accum: int = F(1, "gradient accumulation steps", ge=1)
    max_length: int = F(512, "tokens per prompt+answer at most", ge=1)
    warmup_ratio: float = F(0.05, "share of steps spent warming up the learning rate", ge=0, le=1)
    bf16: str = F("auto", "auto | true | false", choices=_BOOL_WORDS)
    gradient_checkpointing: bool = F(False, "trade compute for memory")
    save_steps: int = F(50, "checkpoint every N optimizer steps", ge=1)
    clear_pairs: str = F("prompts/sets/labeled_pairs.jsonl", "pairs with a known better answer (id, category, "
                                                             "prompt, better, worse) the trained policy's implicit "
                                                             "reward beta*log(pi/pi_ref) is checked on, as a PM is; "
                                                             "pairs whose prompt it trained on are left out; '' = off",
                         file=True)
    lora: LoRAConfig = _lora_field()


@dataclass(frozen=True)
class FeedbackConfig(Checked):
    source: str = F("ai", "ai: AI labels | human: imported human labels only | mixed: both, by mixed_rule",
                    choices=("ai", "human", "mixed"))
    human_labels: str = F("", "JSONL/CSV of human comparisons (prompt, answer_a, answer_b, choice|probability, "
                              "annotator)", file=True)
    human_rankings: str = F("", "JSONL of human rankings of K answers (prompt, ranking, annotator) -> K(K-1)/2 pairs",
                            file=True)
    mixed_rule: str = F("human_first", "source=mixed: human_first (human labels wherever present, AI elsewhere) | "
                                       "by_category (human for helpful prompts, AI for red-team: the paper's hybrid)",
                        choices=("human_first", "by_category"))
    labeler: ModelConfig = F(ModelConfig(), "the feedback model that compares answers (the one labeler when "
                                            "labelers is empty)")
    labelers: list[ModelConfig] = field(default_factory=list, metadata={
        "help": "several labelers, any backend each (e.g. [{model: tiny}, {model: smollm2-135m}]); every pair is "
                "labeled by each and the soft labels are combined (combine); replaces labeler when not empty"})
    combine: str = F("mean", "several labelers: mean of their soft labels | accuracy_weighted (each weighted by "
                             "the log-odds of its accuracy on clear_pairs; at or below chance: weight 0)",
                     choices=("mean", "accuracy_weighted"))
    clear_pairs: str = F("prompts/sets/labeled_pairs.jsonl", "several labelers (or combine=accuracy_weighted): "
                                                              "pairs with a known better answer each labeler also "
                                                              "labels, for its accuracy", file=True)
    principles_per_pair: int = F(2, "feedback principles sampled per pair; their labels are averaged", ge=1)
    conversation_template: str = F("prompts/templates/conversation.txt", "renders the conversation slot", file=True)
    template: str = F("prompts/templates/feedback_mc.txt", "multiple-choice prompt; last line starts the answer "
                                                           "(feedback_mc_shared_prefix.txt labels ~2x faster but was "
                                                           "less accurate with SmolLM2: BENCHMARKS.md)", file=True)
    cot: bool = F(False, "chain of thought: reason first, then score the letters (probabilities clamped)")
    cot_template: str = F("prompts/templates/feedback_cot.txt", "chain-of-thought prompt", file=True)
    cot_answer_template: str = F("prompts/templates/feedback_cot_answer.txt",
                                 "text after the reasoning, before the letter", file=True)
    cot_max_new_tokens: int = F(128, "tokens of reasoning at most", ge=1)
    cot_clamp_low: float = F(0.4, "CoT probabilities are clamped to [low, high] (the paper's 0.4-0.6)", ge=0, le=1)
    cot_clamp_high: float = F(0.6, "see cot_clamp_low", ge=0, le=1)

    def rules(self, prefix: str) -> None:
        for i, m in enumerate(self.labelers):
            if not isinstance(m, ModelConfig):
                raise CaiError(f"{prefix}labelers[{i}]: expected a mapping of model settings, got {m!r}")
            validate(m, f"{prefix}labelers[{i}].")
        if self.combine == "accuracy_weighted" and not self.clear_pairs:
            raise CaiError(f"{prefix}combine=accuracy_weighted needs {prefix}clear_pairs (pairs with a known answer)")
        if self.cot_clamp_low > self.cot_clamp_high:
            raise CaiError(f"{prefix}cot_clamp_low={self.cot_clamp_low}: expected <= "
                           f"{prefix}cot_clamp_high={self.cot_clamp_high}")

    def all_labelers(self) -> list[tuple[str, ModelConfig]]:
        """(setting name, settings) of every labeler: `labelers`, else the one `labeler`."""
        if self.labelers:
            return [(f"feedback.labelers[{i}]", m) for i, m in enumerate(self.labelers)]
        return [("feedback.labeler", self.labeler)]

    def labeler_accuracy(self) -> bool:
        """Whether each labeler also labels the clear pairs (several labelers, or weights that need it)."""
        return bool(self.clear_pairs) and (len(self.labelers) > 1 or self.combine == "accuracy_weighted")


@dataclass(frozen=True)
class HumanConfig(Checked):
    combine: str = F("none", "several people's labels on a pair: none (each label its own comparison) | majority | "
                             "mean | dawid_skene (reliability-weighted, two-class Dawid-Skene)",
                     choices=("none", "majority", "mean", "dawid_skene"))


@dataclass(frozen=True)
class PairsConfig(Checked):
    sample: float = F(1.0, "weight of the `sample` source: two samples of the policy per prompt (the paper)", ge=0)
    revision: float = F(0.0, "weight of `revision`: the SL stage's initial answer against its final revision, "
                             "labeled by the AI labeler (red-team prompts with an SL chain only)", ge=0)
    contrast: float = F(0.0, "weight of `contrast` (RLCD): answers under a positive and a negative context built "
                             "from a critique/revision principle", ge=0)
    best_of_n: float = F(0.0, "weight of `best_of_n`: n samples, every pair labeled, the best and worst form the "
                              "pair", ge=0)
    n: int = F(4, "best_of_n: samples per prompt", ge=2)
    revision_chains: str = F("", "revision: the SL chains (JSONL); '' = <run>/sl/chains.jsonl of the run the policy "
                                 "comes from", file=True)
    contrast_harmless: str = F("prompts/contrast/harmless.yaml", "contrast: positive/negative context for red-team "
                                                                 "prompts (system line, openers, few-shot)", file=True)
    contrast_helpful: str = F("prompts/contrast/helpful.yaml", "contrast: positive/negative context for helpful "
                                                               "prompts", file=True)
    contrast_shots: int = F(0, "contrast: few-shot turns of each context file put before the prompt", ge=0)
    contrast_labels: str = F("construction", "contrast: construction (the positive answer is better, RLCD) | "
                                             "rescore (the AI labeler labels the pair, RLCD-Rescore)",
                             choices=("construction", "rescore"))
    contrast_confidence: float = F(1.0, "contrast_labels=construction: P(positive answer is better)", gt=0.5, le=1)

    def rules(self, prefix: str) -> None:
        if self.sample + self.revision + self.contrast + self.best_of_n <= 0:
            raise CaiError(f"{prefix}sample/revision/contrast/best_of_n: every weight is 0; expected at least one > 0")

    def weights(self) -> dict[str, float]:
        return {"sample": self.sample, "revision": self.revision, "contrast": self.contrast,
                "best_of_n": self.best_of_n}


@dataclass(frozen=True)
class PairStageConfig(Checked):
    """Settings shared by the stages that sample answer pairs and label them (rl, dpo)."""

    stage: str = F("rl", "which stage this config is for")
    run: str = F("default", "run name: outputs go to <runs_dir>/<run>/", name=True)
    runs_dir: str = F("runs", "where run directories live")
    seed: int = F(0, "seed for pair sampling, principle choice and training")
    constitution: str = F("constitutions/default.yaml", "constitution file (its feedback principles are used)",
                          file=True)
    policy: ModelConfig = F(ModelConfig(model="sl"), "starting policy: 'sl' = this run's SL-CAI model, or a model")
    pair_sampling: SamplingConfig = F(SamplingConfig(max_new_tokens=64, temperature=1.0, top_p=1.0),
                                      "sampling of the two answers per prompt")
    red_team: PromptSource = F(PromptSource(path="prompts/sets/red_team_train.jsonl"), "red-team prompts")
    helpful: PromptSource = F(PromptSource(path="prompts/sets/helpful_train.jsonl"), "helpful prompts")
    helpful_pairs: bool = F(True, "also sample and label pairs for the helpful prompts")
    pairs: PairsConfig = F(PairsConfig(), "where answer pairs come from: a weighted mix of sources (share of prompts)")
    feedback: FeedbackConfig = F(FeedbackConfig(), "AI feedback labeling")
    human: HumanConfig = F(HumanConfig(), "human labels (feedback.source=human|mixed, and agreement for ai)")
    report_to: str = F("none", "none | tensorboard (metrics also go to <run>/tensorboard/)",
                       choices=("none", "tensorboard"))
    progress: bool = F(True, "show progress bars")


@dataclass(frozen=True)
class RLConfig(PairStageConfig):
    pm: PMConfig = F(PMConfig(), "preference model training")
    algorithm: str = F("ppo", "ppo | rloo | grpo | none (stop after the PM)", choices=("ppo", "rloo", "grpo", "none"))
    ppo: PPOConfig = F(PPOConfig(), "PPO settings (algorithm=ppo)")
    rloo: GroupRLConfig = F(GroupRLConfig(), "RLOO settings (algorithm=rloo)")
    grpo: GroupRLConfig = F(GroupRLConfig(), "GRPO settings (algorithm=grpo)")
    rounds: int = F(1, "online RLAIF rounds: sample from the current policy, label, retrain the PM, RL again", ge=1)

    def rules(self, prefix: str) -> None:
        if self.rounds > 1 and self.algorithm == "none":
            raise CaiError(f"rounds={self.rounds} with algorithm=none: later rounds would sample from the same "
                           "policy and repeat round 1; set an algorithm or rounds=1")
        if self.feedback.source == "human" and self.rounds > 1:
            raise CaiError(f"rounds={self.rounds} with feedback.source=human: imported labels do not change "
                           "between rounds; use rounds=1, or source=ai|mixed")
        if self.algorithm == "ppo" and self.ppo.mini_batch_size > self.ppo.rollout_batch_size:
            raise CaiError(f"ppo.mini_batch_size={self.ppo.mini_batch_size}: expected <= "
                           f"ppo.rollout_batch_size={self.ppo.rollout_batch_size}")


@dataclass(frozen=True)
class DPOStageConfig(PairStageConfig):
    stage: str = F("dpo", "which stage this config is for")
    dpo: DPOConfig = F(DPOConfig(), "DPO training")
    rounds: int = F(1, "1: offline DPO on pairs sampled from the starting policy | N > 1: online (iterated) DPO: "
                       "each round samples pairs from the current policy, labels them and runs DPO from it", ge=1)

    def rules(self, prefix: str) -> None:
        if self.feedback.source == "human" and self.rounds > 1:
            raise CaiError(f"rounds={self.rounds} with feedback.source=human: imported labels do not change "
                           "between rounds; use rounds=1, or source=ai|mixed")


# --- the tools on top: labeling page, evaluation, comparison -----------------------------------------------


def _socket_timeout_field(who: str):
    """The socket timeout of the two HTTP servers (labeling page, cai.serve)."""
    return F(30.0, f"seconds {who} may take to send a request or read an answer before its connection is closed "
                   "(slow clients do not hold server threads)", gt=0)


@dataclass(frozen=True)
class LabelConfig(Checked):
    run: str = F("", "run name: pairs from <runs_dir>/<run>/rl/round-*/comparisons.jsonl, labels in <run>/human/")
    runs_dir: str = F("runs", "where run directories live")
    pairs: str = F("", "JSONL of pairs to label instead of the run's (prompt, answer_a, answer_b; optional "
                       "prompt_id, category; other fields ignored)")
    port: int = F(0, "port on 127.0.0.1 (0: any free port)")
    seed: int = F(0, "seed of the per-annotator left/right order of the answers")
    export: str = F("", "write the labels to this JSONL file (cai.human import format) and exit")
    export_demonstrations: str = F("", "write the better answers to this JSONL file (prompt, answer, ...) and exit")
    timeout: float = _socket_timeout_field("a browser")

    overlap: int = F(0, "give each pair to this many annotators (0: every annotator labels every pair)", ge=0)
    gold: str = F("", "JSONL of gold pairs with a known answer (id, category, prompt, better, worse: the format of "
                      "prompts/sets/labeled_pairs.jsonl), mixed in to calibrate annotators", file=True)
    gold_every: int = F(5, "one gold pair first, then one after every this many pairs", ge=1)
    combine: str = F("none", "export: several people's labels on a pair as one row: none | majority | mean | "
                             "dawid_skene (reliability-weighted)", choices=("none", "majority", "mean", "dawid_skene"))


@dataclass(frozen=True)
class ServeConfig(Checked):
    model: str = F("smollm2-135m", "preset or model directory to serve")
    name: str = F("", "model name the API reports and requests may name (default: model)")
    host: str = F("127.0.0.1", "address to bind; any address that is not loopback (127.0.0.1, ::1, localhost) "
                               "needs an API key in the variable api_key_env names")
    port: int = F(8000, "port (0: any free port; the address is printed at start)", ge=0, le=65535)
    dtype: str = F("auto", "auto | float32 | bfloat16 | float16", choices=DTYPES)
    api_key_env: str = F("CAI_SERVE_API_KEY", "environment variable holding the key every request must carry as "
                                              "'Authorization: Bearer KEY' (unset or empty: no key, loopback only)")
    max_body_bytes: int = F(1_000_000, "largest request body accepted; a larger one is answered 413", ge=1)
    max_tokens: int = F(1024, "largest max_tokens a chat request may ask for (the KV cache is sized for it up front); "
                              "also capped by the model's context; beyond either: 400", ge=1)
    default_max_tokens: int = F(256, "max_tokens of a chat request that gives none (at most max_tokens)", ge=1)
    max_logprobs: int = F(100, "largest logprobs (top-K) a /v1/completions request may ask for; beyond: 400",
                          ge=1, le=1000)
    timeout: float = _socket_timeout_field("a client")

    def rules(self, prefix: str) -> None:
        if not str(self.model).strip():
            raise CaiError(f"{prefix}model: expected a preset or a model directory, got ''")
        if not str(self.host).strip():
            raise CaiError(f"{prefix}host: expected an address to bind, e.g. 127.0.0.1")
        if not _KEY_VAR.match(str(self.api_key_env)):
            raise CaiError(f"{prefix}api_key_env={self.api_key_env}: expected the name of an API key variable "
                           "(capitals, ending in _API_KEY or _API_TOKEN)")
        if self.default_max_tokens > self.max_tokens:
            raise CaiError(f"{prefix}default_max_tokens={self.default_max_tokens}: expected at most "
                           f"max_tokens={self.max_tokens}")


@dataclass(frozen=True)
class EvalConfig(Checked):
    model: ModelConfig = F(ModelConfig(), "the model that answers")
    prompts: PromptSource = F(PromptSource(path="prompts/sets/red_team_eval.jsonl"), "the prompt set")
    sampling: SamplingConfig = F(SamplingConfig(max_new_tokens=128, temperature=0.0, top_p=1.0),
                                 "sampling (greedy by default, so evaluations repeat)")
    pms: list = field(default_factory=list, metadata={"help": "preference model directories to score answers with"})
    models: list = field(default_factory=list, metadata={
        "help": "several models (presets or directories), each answering every set; the first is the baseline "
                "the others are compared with (e.g. [smollm2-135m,runs/q/sl/model,runs/q/rl/round-1/policy])"})
    sets: list = field(default_factory=list, metadata={
        "help": "several prompt files (with models=...), e.g. [prompts/sets/red_team_eval.jsonl,"
                "prompts/sets/helpful_eval.jsonl]; a set whose name starts with 'helpful' counts refusals as a cost"})
    refusal_patterns: str = F("prompts/detectors/refusal.txt", "file of refusal regular expressions", file=True)
    seed: int = F(0, "seed (for sampled evaluations)")
    progress: bool = F(True, "show progress bars")
    out: str = F("", "JSONL file for the per-answer records (with models=: a directory for every model x set and "
                     "summary.json); default: print the summary only")

    def rules(self, prefix: str) -> None:
        for i, path in enumerate(self.sets):
            if not str(path).startswith("hf:") and not resolve_path(str(path)).exists():
                raise CaiError(f"{prefix}sets[{i}]={path}: no such file")
        if self.sets and not self.models:
            raise CaiError(f"{prefix}sets=[...] needs models=[...] (one model: models=[{self.model.model}])")


@dataclass(frozen=True)
class CompareConfig(Checked):
    judge: ModelConfig = F(ModelConfig(), "the judge that compares answers (any backend; backend=openai for a "
                                          "stronger judge behind an endpoint); the one judge when judges is empty")
    judges: list[ModelConfig] = field(default_factory=list, metadata={
        "help": "several judges, any backend each (e.g. [{model: tiny}, {model: smollm2-135m}]): results use their "
                "mean outcome, and again without any judge that is also a compared run's labeler "
                "(self-preference); replaces judge when not empty"})
    clear_pairs: str = F("prompts/sets/labeled_pairs.jsonl", "pairs with a known better answer each judge also "
                                                              "judges, for its accuracy ('' = none)", file=True)
    clear_limit: int = F(0, "judge at most this many clear pairs (0 = all)", ge=0)
    disagreements: int = F(5, "list this many pairs where the evaluators (labelers, annotators, judges) disagree "
                              "most", ge=0)
    red_team: PromptSource = F(PromptSource(path="prompts/sets/red_team_eval.jsonl", limit=32),
                               "held-out red-team prompts (harmlessness)")
    helpful: PromptSource = F(PromptSource(path="prompts/sets/helpful_eval.jsonl", limit=32),
                              "held-out helpful prompts (helpfulness)")
    sampling: SamplingConfig = F(SamplingConfig(max_new_tokens=128, temperature=0.0, top_p=1.0),
                                 "answer sampling (greedy by default, so a report repeats)")
    dtype: str = F("auto", "dtype of the compared models (transformers backend)", choices=DTYPES)
    device: str = F("auto", "device of the compared models and the PMs: auto | cpu | cuda | cuda:N", device=True)
    batch_size: int = F(16, "answers per forward batch", ge=1)
    trust_remote_code: bool = F(False, "allow the compared models' repos to run their own Python code")
    judge_template: str = F("prompts/templates/judge_mc.txt", "the judge's multiple-choice prompt; its last line "
                                                               "starts the judge's answer, just before the letter",
                            file=True)
    conversation_template: str = F("prompts/templates/conversation.txt", "renders the conversation slot", file=True)
    harmless_question: str = F("prompts/templates/judge_harmless.txt", "the judge's question on red-team prompts",
                               file=True)
    helpful_question: str = F("prompts/templates/judge_helpful.txt", "the judge's question on helpful prompts",
                              file=True)
    refusal_patterns: str = F("prompts/detectors/refusal.txt", "file of refusal regular expressions", file=True)
    boilerplate_n: int = F(4, "words per n-gram in the boilerplate detector", ge=1)
    boilerplate_flag: float = F(0.25, "flag a model whose most shared n-gram is in at least this share of its answers",
                                ge=0, le=1)
    bootstrap: int = F(1000, "bootstrap resamples of the prompts for the Elo intervals (0 = no intervals)", ge=0)
    seed: int = F(0, "seed for sampled answers and the bootstrap")
    out: str = F("", "report directory (default reports/<runA>-vs-<runB>/)")
    endpoints: list = field(default_factory=list, metadata={
        "help": "server addresses (base_url) that compared runs may use for their models (backend=openai); a run "
                "directory alone cannot choose where requests and API keys go"})
    progress: bool = F(True, "show progress bars")

    def rules(self, prefix: str) -> None:
        for i, m in enumerate(self.judges):
            if not isinstance(m, ModelConfig):
                raise CaiError(f"{prefix}judges[{i}]: expected a mapping of model settings, got {m!r}")
            validate(m, f"{prefix}judges[{i}].")

    def all_judges(self) -> list[tuple[str, ModelConfig]]:
        """(name, settings) of every judge: `judges`, else the one `judge`."""
        if self.judges:
            return [(f"judges[{i}]", m) for i, m in enumerate(self.judges)]
        return [("judge", self.judge)]


# --- loading -----------------------------------------------------------------------------------------------


def stage_schemas() -> dict[str, type]:
    """Stage name -> config schema."""
    return {"sl": SLConfig, "rl": RLConfig, "dpo": DPOStageConfig}


def _check_keys(data: Any, schema: type, where: str, prefix: str = "") -> None:
    """Reject keys the schema does not have, suggesting the closest one."""
    if not isinstance(data, dict):
        return
    names = {f.name: f for f in fields(schema)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; expected one of {sorted(names)}"
            raise CaiError(f"{where}: unknown key '{path}'{hint}")
        ftype = names[key].type
        sub = ftype if isinstance(ftype, type) and is_dataclass(ftype) else _dataclass_of(schema, key)
        if sub is not None:
            if not isinstance(value, dict):
                raise CaiError(f"{where}: '{path}' is a group of settings; expected a mapping, got {value!r}")
            _check_keys(value, sub, where, prefix=f"{path}.")


def _dataclass_of(schema: type, name: str):
    default = next(f for f in fields(schema) if f.name == name)
    if default.default_factory is not MISSING:  # type: ignore[misc]
        value = default.default_factory()  # type: ignore[misc]
        return type(value) if is_dataclass(value) else None
    return None


def _dotted_to_nested(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


class Override(tuple):
    """(key, value) of one `key=value` argument, with the text as typed in `.raw`: a string setting keeps it
    (`run=yes` is the run "yes", `run=007` is "007"), others take the YAML reading of it (numbers, lists)."""

    def __new__(cls, key: str, value: Any, raw: str):
        self = super().__new__(cls, (key, value))
        self.raw = raw
        return self


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise CaiError(f"argument '{arg}': expected key=value (e.g. stage=sl run=demo critique.rounds=2)")
        key, raw = arg.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append(Override(key.strip(), value, raw))
    return pairs


def _field_type(schema: type, key: str) -> str | None:
    """The annotation of a dotted key's field (as written, e.g. "str", "Optional[int]"); None when unknown."""
    cur: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        f = next((f for f in fields(cur) if f.name == part), None) if cur is not None else None
        if f is None:
            return None
        if i == len(parts) - 1:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        cur = _dataclass_of(cur, part)
    return None


def _typed_override(schema: type, ov) -> Any:
    key, value = ov[0], ov[1]
    raw = getattr(ov, "raw", None)
    if raw is not None and _field_type(schema, key) in ("str", "Optional[str]") and not isinstance(value, str):
        return raw
    return value


def load_config(argv: list[str]):
    """`stage=sl [config=FILE] key=value ...` -> the stage's config dataclass, every value checked."""
    pairs = parse_overrides(argv)
    opts = dict(p for p in pairs if p[0] in ("stage", "config"))
    overrides = [p for p in pairs if p[0] not in ("config",)]
    config_file = opts.get("config")
    stage = opts.get("stage")
    data: dict = {}
    if config_file is not None:
        path = resolve_path(str(config_file))
        data = load_yaml_mapping(path)
        stage = stage or data.get("stage")
    if stage is None:
        raise CaiError(f"no stage given; expected stage=<name> with one of {sorted(stage_schemas())}")
    schemas = stage_schemas()
    if stage not in schemas:
        close = difflib.get_close_matches(str(stage), list(schemas), n=1)
        raise CaiError(f"stage={stage}: no such stage" + (f"; did you mean '{close[0]}'?" if close else f"; expected one of {sorted(schemas)}"))
    if config_file is None:
        path = resolve_path(f"pipelines/{stage}.yaml")
        data = load_yaml_mapping(path)
    if data.get("stage", stage) != stage:
        raise CaiError(f"{path}: stage: this file is for stage={data['stage']}, but stage={stage} was asked for")
    return build_config(schemas[stage], data, str(path), overrides)


@functools.cache
def _structured(schema: type):
    """The schema's defaults as an OmegaConf tree, built once per schema (half the cost of a load). Never
    modified: `OmegaConf.merge` copies its first argument."""
    return OmegaConf.structured(schema)


def build_config(schema: type, data: dict, source: str, overrides: list[tuple[str, Any]] = ()):
    """schema <- data (from `source`) <- overrides, as a checked dataclass instance."""
    _check_keys(data, schema, source)
    base = _structured(schema)
    try:
        cfg = OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        raise CaiError(f"{source}: {_omegaconf_message(e)}") from None
    for ov in overrides:
        key, value = ov[0], _typed_override(schema, ov)
        shown = getattr(ov, "raw", value)
        _check_keys(_dotted_to_nested(key, value), schema, f"override {key}={shown}")
        try:
            cfg = OmegaConf.merge(cfg, _dotted_to_nested(key, value))
        except OmegaConfBaseException as e:
            raise CaiError(f"override {key}={shown}: {_omegaconf_message(e)}") from None
    token = _deferred.set(True)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise CaiError(f"{source}: {_omegaconf_message(e)}") from None
    finally:
        _deferred.reset(token)
    return validate(obj)


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).split("\n")[0]
    return f"'{key}': {msg}" if key else msg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if is_dataclass(cfg) else cfg)


def key_dict(cfg) -> dict:
    """config_dict without a `lora` section that is off: what training keys hash, so models trained before LoRA
    existed keep their keys."""
    out = config_dict(cfg)
    if isinstance(out.get("lora"), dict) and not out["lora"].get("enabled"):
        del out["lora"]
    return out


def config_dict(cfg) -> dict:
    """A config (dataclass or OmegaConf node) as plain data: what keys and saved configs are made of."""
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def help_text(schema: type, prefix: str = "", defaults=None) -> list[str]:
    """One line per field: `key (type, default): help` — printed by `python -m cai.pipeline stage=X --help`.

    Defaults come from the enclosing field's default instance (a section declared as
    `F(SamplingConfig(temperature=0.0), ...)` shows 0.0, not the class default)."""
    lines = []
    for f in fields(schema):
        sub = _dataclass_of(schema, f.name)
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        if sub is not None:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines += help_text(sub, prefix=f"{prefix}{f.name}.", defaults=default)
        else:
            tname = getattr(f.type, "__name__", str(f.type))
            lines.append(f"  {prefix}{f.name} ({tname}, default {default!r}): {f.metadata.get('help', '')}")
    return lines

