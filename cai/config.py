"""Typed configs: dataclass schema <- pipelines/<stage>.yaml <- key=value overrides (OmegaConf).

Every field has a type, a default and one line of help (the `help` metadata). Unknown keys fail with a
close-match suggestion; a value of the wrong type fails naming the key and where it came from.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cai.errors import CaiError
from cai.paths import resolve_path


def F(default, help: str):  # noqa: A002 - a field with help text
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda d=default: type(d)(**vars(d)) if is_dataclass(d) else type(d)(d),
                     metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    model: str = F("smollm2-135m", "preset (smollm2-135m, tiny), local model dir, or hub id (online only)")
    backend: str = F("transformers", "transformers | vllm (GPU, the vllm extra) | openai (an OpenAI-compatible "
                                     "server) | fake (control-flow tests)")
    dtype: str = F("auto", "auto (bf16 where the CPU/GPU has it, else fp32) | float32 | bfloat16 | float16")
    device: str = F("auto", "auto | cpu | cuda | cuda:N")
    batch_size: int = F(16, "requests per forward batch (length-bucketed)")
    trust_remote_code: bool = F(False, "allow model repos to run their own Python code (off unless you trust it)")
    base_url: str = F("", "backend=openai: server address, e.g. http://127.0.0.1:8000 (model = served model name)")
    api_key_env: str = F("OPENAI_API_KEY", "backend=openai: environment variable holding the API key (never saved)")
    tokenizer: str = F("", "backend=openai: local model dir or preset with the served model's chat template "
                           "(needed for option scoring)")
    concurrency: int = F(8, "backend=openai: requests in flight at most")
    gpu_memory_utilization: float = F(0.85, "backend=vllm: share of the GPU's memory vLLM may take (weights + KV "
                                            "cache)")
    max_model_len: int = F(0, "backend=vllm: tokens of context to reserve KV cache for (0 = the model's own limit)")
    enable_prefix_caching: bool = F(True, "backend=vllm: reuse the KV cache of shared prompt prefixes (few-shot, "
                                          "templates)")
    tensor_parallel_size: int = F(1, "backend=vllm: GPUs one copy of the model is split across")


@dataclass
class SamplingConfig:
    max_new_tokens: int = F(128, "tokens generated at most per answer, critique or revision")
    temperature: float = F(0.7, "softmax temperature; 0 = greedy")
    top_p: float = F(0.9, "nucleus sampling mass")
    top_k: int = F(0, "top-k cut-off; 0 = off")


@dataclass
class PromptSource:
    path: str = F("", "JSONL/JSON/CSV/Parquet file, or hf:NAME for a hub dataset (online only)")
    column: str = F("prompt", "column holding the prompt text")
    id_column: str = F("id", "column holding a stable id (row number when absent)")
    category_column: str = F("category", "column holding a category (optional)")
    split: str = F("train", "split, for hub datasets")
    limit: Optional[int] = F(None, "use only the first N prompts")


@dataclass
class CritiqueConfig:
    rounds: int = F(4, "critique->revision rounds per red-team prompt (the paper uses 4)")
    few_shot: int = F(2, "few-shot demonstrations prepended to each critique and revision request (0 allowed)")
    few_shot_file: str = F("prompts/few_shot/critique_revision.yaml", "critique/revision demonstrations")
    critique_template: str = F("prompts/templates/critique.txt", "template of the critique request")
    revision_template: str = F("prompts/templates/revision.txt", "template of the revision request")


@dataclass
class SFTConfig:
    data: str = F("final", "final: train on the last revision | all: one example per revision round (as the paper)")
    helpful_ratio: float = F(1.0, "helpful-prompt examples per red-team example in the SFT mix")
    epochs: float = F(1.0, "passes over the SFT data")
    learning_rate: float = F(5e-5, "AdamW learning rate")
    batch_size: int = F(8, "examples per device step")
    grad_accum: int = F(1, "gradient accumulation steps")
    max_length: int = F(512, "tokens per example at most (longer ones are truncated)")
    warmup_ratio: float = F(0.05, "share of steps spent warming up the learning rate")
    bf16: str = F("auto", "auto (where the hardware has it) | true | false")
    gradient_checkpointing: bool = F(False, "trade compute for memory (off: faster on CPU at this size)")
    save_steps: int = F(50, "checkpoint every N optimizer steps (a killed run resumes from the last one)")


@dataclass
class SLConfig:
    stage: str = F("sl", "which stage this config is for")
    run: str = F("default", "run name: outputs go to <runs_dir>/<run>/")
    runs_dir: str = F("runs", "where run directories live")
    seed: int = F(0, "seed for principle sampling and generation")
    constitution: str = F("constitutions/default.yaml", "constitution file")
    generator: ModelConfig = F(ModelConfig(), "the helpful-only starting model: answers, critiques, revises")
    sampling: SamplingConfig = F(SamplingConfig(), "sampling for answers, critiques and revisions")
    red_team: PromptSource = F(PromptSource(path="prompts/sets/red_team_train.jsonl"), "red-team prompts")
    helpful: PromptSource = F(PromptSource(path="prompts/sets/helpful_train.jsonl"), "helpful prompts for the SFT mix")
    critique: CritiqueConfig = F(CritiqueConfig(), "critique/revision settings")
    sft: SFTConfig = F(SFTConfig(), "supervised fine-tuning of the SL-CAI model")
    shard: str = F("", "i/n: generate only shard i of n of the prompts (processes or nodes); a run without shard= "
                       "merges the shards' records (keys make the merge exact), then builds the data and trains")
    source: str = F("revisions", "SFT data: revisions (AI critique/revision) | human (demonstrations) | both")
    human_demonstrations: str = F("", "JSONL/CSV of human-written answers (prompt, answer, annotator) for source=human|both")
    train: bool = F(True, "run SFT after generating the data (false: data only)")
    report_to: str = F("none", "none | tensorboard (metrics also go to <run>/tensorboard/)")
    progress: bool = F(True, "show progress bars")


# --- RL-CAI trainers' settings (here, not in the trainers' modules, so reading a config imports no trainer) --


@dataclass
class PMConfig:
    epochs: float = F(1.0, "passes over the training comparisons")
    learning_rate: float = F(1e-5, "AdamW learning rate")
    batch_size: int = F(8, "comparisons per device step (the model sees twice as many sequences)")
    grad_accum: int = F(1, "gradient accumulation steps")
    max_length: int = F(512, "tokens per conversation at most; TRL drops comparisons with a longer side")
    warmup_ratio: float = F(0.05, "share of steps spent warming up the learning rate")
    bf16: str = F("auto", "auto (where the hardware has it) | true | false")
    gradient_checkpointing: bool = F(False, "trade compute for memory (off: faster on CPU at this size)")
    save_steps: int = F(50, "checkpoint every N optimizer steps (a killed run resumes from the last one)")
    eval_fraction: float = F(0.1, "share of comparisons held out for evaluation, chosen by hashing each key")
    center_rewards_coefficient: Optional[float] = F(None, "weight of mean((r_chosen + r_rejected)^2), pulls rewards "
                                                          "toward 0 (TRL; 0.01 recommended); null = off")


@dataclass
class PPOConfig:
    steps: int = F(20, "PPO iterations (one rollout + its updates each)")
    rollout_batch_size: int = F(8, "prompts sampled per rollout, per process")
    mini_batch_size: int = F(4, "rollouts per optimizer update")
    ppo_epochs: int = F(2, "passes over each rollout batch")
    learning_rate: float = F(1e-5, "AdamW learning rate of the policy")
    value_learning_rate: float = F(1e-5, "AdamW learning rate of the value model (its own param group)")
    max_new_tokens: int = F(32, "tokens sampled at most per answer")
    temperature: float = F(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature")
    top_p: float = F(1.0, "nucleus sampling mass (1 = off; < 1 makes the sampler differ from the trained policy)")
    init_kl_coef: float = F(0.05, "beta: weight of the per-token KL penalty to the reference model")
    adaptive_kl: bool = F(False, "adapt beta so the KL tracks kl_target (Ziegler et al. 2019)")
    kl_target: float = F(6.0, "target KL (nats per answer) for the adaptive controller")
    kl_horizon: int = F(10000, "horizon (in rollouts) of the adaptive controller")
    kl_estimator: str = F("k1", "per-token KL estimator: k1 | k3 | mse | abs (http://joschu.net/blog/kl-approx.html)")
    gamma: float = F(1.0, "discount over answer tokens")
    lam: float = F(0.95, "GAE lambda")
    clip_range: float = F(0.2, "PPO ratio clip epsilon")
    clip_range_value: float = F(0.2, "value clip epsilon")
    vf_coef: float = F(0.1, "weight of the value loss")
    value_init: str = F("pm", "pm: value model initialised from the PM (InstructGPT) | policy: the policy's "
                              "backbone with a zero value head")
    whiten_advantages: bool = F(True, "normalize advantages over the rollout batch")
    whiten_rewards: bool = F(False, "scale per-token rewards to unit variance before GAE")
    missing_eos_penalty: Optional[float] = F(None, "subtracted from the score of an answer cut off without EOS")
    ptx_coef: float = F(0.0, "PPO-ptx: weight of the SFT loss on sft_examples mixed into each update (0 = off)")
    ptx_max_length: int = F(512, "tokens per SFT example at most for the ptx loss (longer ones are truncated)")
    max_grad_norm: float = F(1.0, "gradient clipping norm over policy + value parameters")
    sample_every: int = F(5, "log a table of sample answers every N steps (0 = never)")
    save_every: int = F(10, "checkpoint every N steps (and at the end)")
    bf16: str = F("auto", "auto (where the hardware has it) | true | false; mixed precision over fp32 weights")
    seed: int = F(0, "seed for prompt order, sampling and minibatch order")


def stage_schemas() -> dict[str, type]:
    """Stage name -> config schema. The RL schemas import the trainers' configs, so they load on demand."""
    from cai.rl import DPOStageConfig, RLConfig

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
        pairs.append((key.strip(), value))
    return pairs


def load_config(argv: list[str]):
    """`stage=sl [config=FILE] key=value ...` -> a typed config object (OmegaConf-backed, read-only)."""
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


def read_yaml(path: Path, what: str = "config", shown: str | None = None) -> Any:
    """yaml.safe_load of a file; a missing file, non-UTF-8 bytes or bad YAML is a CaiError at file:line:column."""
    shown = shown or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaiError(f"{shown}: {what} file not found") from None
    except UnicodeDecodeError as e:
        raise CaiError(f"{shown}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        raise CaiError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None


def load_yaml_mapping(path: Path) -> dict:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CaiError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def build_config(schema: type, data: dict, source: str, overrides: list[tuple[str, Any]] = ()):
    _check_keys(data, schema, source)
    base = OmegaConf.structured(schema)
    try:
        cfg = OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        raise CaiError(f"{source}: {_omegaconf_message(e)}") from None
    for key, value in overrides:
        _check_keys(_dotted_to_nested(key, value), schema, f"override {key}={value}")
        try:
            cfg = OmegaConf.merge(cfg, _dotted_to_nested(key, value))
        except OmegaConfBaseException as e:
            raise CaiError(f"override {key}={value}: {_omegaconf_message(e)}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).split("\n")[0]
    return f"'{key}': {msg}" if key else msg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)


def config_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def stable_hash(obj: Any, n: int = 24) -> str:
    """Hash of a JSON-able object, independent of key order: the basis of every record key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:n]


def open_metrics(run_dir: Path, stage: str, report_to: str):
    """The run's metrics log; with report_to=tensorboard also TensorBoard scalars under <run>/tensorboard/."""
    from cai.store import Metrics

    if report_to not in ("none", "tensorboard"):
        raise CaiError(f"report_to={report_to}: expected none or tensorboard")
    return Metrics(run_dir / "metrics.jsonl", stage, run_dir / "tensorboard" if report_to == "tensorboard" else None)


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
