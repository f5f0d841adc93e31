"""What every TRL-trained stage (SFT, PM, DPO) shares: keys, common arguments, checkpoint resume, saving.

A trained model is keyed by (data, base model identity, settings, seed): a rerun with the same key reuses the
saved model. Checkpoints live under <ckpt_root>/<key>/; HF's Trainer writes `trainer_state.json` last, so a
checkpoint whose state file parses is complete and a killed run resumes from the newest such one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

from cai.errors import CaiError, NonFiniteError
from cai.io import write_atomic
from cai.models import ModelRef, cpu_supports_bf16
from cai.records import stable_hash
from cai.store import Metrics

TRAIN_INFO = "cai_train.json"
ADAPTER_DIR = "adapter"  # a LoRA-trained model's adapter, beside its merged weights


def memory_gib() -> tuple[float, float] | None:
    """(resident set now, its peak so far) of this process in GiB, from /proc/self/status (VmRSS, VmHWM); None
    where /proc lacks them (not Linux). Read only: the peak is never reset, so `ru_maxrss` and /usr/bin/time still
    see the whole run's."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return None


def training_key(data: bytes, base: ModelRef, settings: dict, seed: int) -> str:
    return stable_hash({"data": hashlib.sha256(data).hexdigest(), "base": base.identity, "settings": settings,
                        "seed": seed})


def trained_model_matches(model_dir: Path, key: str) -> bool:
    info = model_dir / TRAIN_INFO
    return info.exists() and json.loads(info.read_text()).get("key") == key


def reuse_or_train(model_dir: Path, key: str, train) -> dict:
    """The one "reuse a trained model or train it" check: the model in model_dir when its cai_train.json carries
    this key (its summary, with reused=True), else `train()` (which saves the model with the key)."""
    if trained_model_matches(model_dir, key):
        return {**json.loads((model_dir / TRAIN_INFO).read_text()), "reused": True}
    return train()


def use_bf16(setting: str, device: str, name: str = "bf16") -> bool:
    """bf16 autocast where the hardware has it: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    if str(setting) == "auto":
        import torch

        return torch.cuda.is_bf16_supported(including_emulation=False) if device.startswith("cuda") else cpu_supports_bf16()
    if str(setting).lower() in ("true", "false"):
        return str(setting).lower() == "true"
    raise CaiError(f"{name}={setting!r}: expected auto, true or false")


def common_args(cfg, ckpt_dir: Path, device: str, seed: int, progress: bool) -> dict:
    """TrainingArguments shared by our TRL stages; `cfg` has epochs, learning_rate, batch_size, grad_accum,
    warmup_ratio, bf16, gradient_checkpointing, save_steps. On CPU, bf16 and checkpointing are set
    explicitly because TRL's defaults assume a GPU."""
    return dict(
        output_dir=str(ckpt_dir), num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type="linear", bf16=use_bf16(cfg.bf16, device),
        activation_checkpointing=cfg.gradient_checkpointing, use_cpu=device == "cpu", save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=1, logging_steps=1,
        report_to=[],  # metrics go through cai.store.Metrics (metrics.jsonl, and TensorBoard when asked)
        seed=seed, data_seed=seed,
        disable_tqdm=not progress, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # launched: every parameter gets a gradient; skip DDP's extra graph walk
    )


def with_lora(model, lora, task_type: str, where: str):
    """`model` with fresh LoRA adapters (a PeftModel) when `lora.enabled`, else `model` itself. task_type is
    CAUSAL_LM or SEQ_CLS (then the `score` head is trained whole beside the adapters). `where` prefixes errors
    (e.g. "sft.lora")."""
    if lora is None or not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # no module matched, or a module type LoRA cannot wrap
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise CaiError(f"{where}.target_modules={targets}: {str(e).splitlines()[0]}; this model's linear layers "
                       f"are {names}") from None


def is_lora(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


def save_pretrained_merged(model, out_dir: Path, state_dict=None) -> None:
    """Save a model as safetensors; a LoRA model (PeftModel) is saved as its merged weights (a plain HF model
    directory: every stage, cai.serve and vLLM load it) plus its adapter in out_dir/adapter/. Merging changes
    the model in place: call it last."""
    if is_lora(model):
        model.save_pretrained(out_dir / ADAPTER_DIR, safe_serialization=True)
        model = model.merge_and_unload()
        state_dict = None
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.exists():
        return None
    ckpts = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    done = [c for c in ckpts if _complete_state(c / "trainer_state.json")]
    return done[-1] if done else None


def _complete_state(path: Path) -> bool:
    """The Trainer writes trainer_state.json last but not atomically: a kill mid-write leaves it empty or cut
    short, and that checkpoint must be skipped (resuming from it fails on the JSON)."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def metrics_callback(metrics: Metrics, prefix: str, get_trainer):
    """A TrainerCallback: namespaced metrics to metrics.jsonl, tokens/s on the progress bar."""
    from transformers import TrainerCallback

    class ToMetrics(TrainerCallback):
        t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return
            if "num_tokens" in logs:
                logs["tokens_per_s"] = round(float(logs["num_tokens"]) / max(time.time() - self.t0, 1e-9), 1)
                bar = next((getattr(c, "training_bar", None) for c in get_trainer().callback_handler.callbacks
                            if getattr(c, "training_bar", None) is not None), None)
                if bar is not None:
                    bar.set_postfix(tok_s=logs["tokens_per_s"], loss=logs.get("loss"))
            metrics.log({f"{prefix}/{k}": v for k, v in logs.items()}, step=state.global_step)

    return ToMetrics()


def first_non_finite(named_tensors) -> str | None:
    """The name of the first tensor holding a NaN or inf, else None (one device sync for all of them)."""
    import torch

    named = [(n, t) for n, t in named_tensors if t is not None and t.numel()]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


def finite_callback(what: str, ckpt_dir: Path):
    """A TrainerCallback that stops training at the first non-finite loss, gradient or weight, before the
    optimizer step spreads it and before the Trainer saves a checkpoint (HF saves after on_step_end/on_log)."""
    from transformers import TrainerCallback

    def stop(kind: str, where: str, step: int):
        last = last_checkpoint(ckpt_dir)
        keep = f"last good checkpoint: {last} (a rerun resumes from it)" if last else "no checkpoint was written"
        raise NonFiniteError(f"{what}: {kind} is not finite at step {step} ({where}); stopped before saving it, "
                             f"no model was published; {keep}; lower the learning rate or check the data")

    class StopOnNonFinite(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if model is not None:
                bad = first_non_finite((n, p.grad) for n, p in model.named_parameters())
                if bad:
                    stop("gradient", bad, state.global_step + 1)

        def on_step_end(self, args, state, control, model=None, **kw):
            if model is not None:
                bad = first_non_finite((n, p.detach()) for n, p in model.named_parameters())
                if bad:
                    stop("weight", bad, state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            for k in ("loss", "grad_norm"):
                v = (logs or {}).get(k)
                if isinstance(v, (int, float)) and not math.isfinite(v):
                    stop(k.replace("_", " "), f"{k}={v}", state.global_step)

    return StopOnNonFinite()


def save_trained(trainer, tokenizer, out_dir: Path, card: str, summary: dict, ckpt_dir: Path | None = None) -> None:
    """A trainer's model as safetensors + tokenizer + model card + cai_train.json, swapped into place whole; then
    drop the checkpoints. Under `accelerate launch` every process calls this: the weights are gathered from all
    of them (DeepSpeed ZeRO-3 and FSDP shard them), the main process writes, the others wait until it is done."""
    accelerator = trainer.accelerator
    state_dict = None if is_lora(accelerator.unwrap_model(trainer.model_wrapped)) else \
        accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = accelerator.unwrap_model(trainer.model_wrapped)
        save_pretrained_merged(model, tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        write_atomic(tmp / TRAIN_INFO, json.dumps(summary, indent=1))
        swap_into_place(tmp, out_dir)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()


def length_side(row: dict) -> str:
    """Which clear-pair answer has more words: better_longer | better_shorter | same_length."""
    b, w = len(row["better"].split()), len(row["worse"].split())
    return "better_longer" if b > w else "better_shorter" if b < w else "same_length"


def clear_pair_stats(rows: list[dict], better: list[float], worse: list[float], left_out: int = 0) -> dict:
    """How a scorer ranks clear pairs (a known better and worse answer; rows {category, better, worse, ...} with
    the better and worse answers' scores): the share where the better one scores higher, overall, per category and
    by which answer is longer (`by_length`: a scorer that reads length alone scores 1 on one side and 0 on the
    other), and the mean margin (better - worse). Chance is 0.5; ties count as wrong. `left_out`: pairs not
    scored (e.g. trained on)."""
    out = {"count": len(rows), "left_out": left_out, "accuracy": None, "mean_margin": None, "by_category": {},
           "by_length": {}}
    if len(better) != len(rows) or len(worse) != len(rows):
        raise ValueError(f"clear_pair_stats: {len(rows)} pairs but {len(better)} and {len(worse)} scores")
    if not rows:
        return out
    right = [b > w for b, w in zip(better, worse)]
    out["accuracy"] = sum(right) / len(rows)
    out["mean_margin"] = sum(b - w for b, w in zip(better, worse)) / len(rows)
    for split, side in (("by_category", lambda r: r["category"]), ("by_length", length_side)):
        sides = [side(r) for r in rows]
        for key in sorted(set(sides)):
            idx = [i for i, x in enumerate(sides) if x == key]
            out[split][key] = {"count": len(idx), "accuracy": sum(right[i] for i in idx) / len(idx)}
    return out


def padded_batches(rows: list[list[int]], batch_size: int, pad_id: int):
    """Token rows in length-sorted batches, right-padded: yields (indices into rows, ids, attention mask), the
    tensors (b, width) on the CPU. Sorting by length keeps the padding small."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
        yield idx, ids, mask


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the finished directory tmp (a killed swap leaves the old or the new one, or .old)."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
