"""Supervised fine-tuning of the SL-CAI model with TRL's SFTTrainer (loss on the assistant turn only).

The trained model is keyed by (SFT data, base model identity, SFT settings): a rerun with the same key reuses
the saved model; a killed run resumes from its last checkpoint under `sl/checkpoints/<key>/`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from cai.config import config_dict, stable_hash
from cai.errors import CaiError
from cai.models import ModelRef, cpu_supports_bf16, pick_device
from cai.store import Metrics, write_atomic

TRAIN_INFO = "cai_train.json"


def training_key(sft_path: Path, base: ModelRef, sft_cfg, seed: int) -> str:
    import hashlib

    data_sha = hashlib.sha256(sft_path.read_bytes()).hexdigest()
    return stable_hash({"data": data_sha, "base": base.identity, "sft": config_dict(sft_cfg), "seed": seed})


def trained_model_matches(model_dir: Path, key: str) -> bool:
    info = model_dir / TRAIN_INFO
    return info.exists() and json.loads(info.read_text()).get("key") == key


def _use_bf16(setting: str, device: str) -> bool:
    if setting == "auto":
        import torch

        return torch.cuda.is_bf16_supported() if device.startswith("cuda") else cpu_supports_bf16()
    return setting in ("true", "True", True)


def train_sft(sft_path: Path, base: ModelRef, cfg, out_dir: Path, ckpt_root: Path, metrics: Metrics,
              model_card: str, key: str, device: str = "auto", progress: bool = True) -> dict:
    """Train on `sft_path` (prompt/completion conversations) and save safetensors + tokenizer + card to out_dir."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from cai.backends.transformers_backend import configure_cpu_threads
    from cai.models import load_tokenizer

    configure_cpu_threads()
    datasets.disable_progress_bars()
    device = pick_device(device)
    sft = cfg.sft
    ds = datasets.load_dataset("json", data_files=str(sft_path), split="train").select_columns(["prompt", "completion"])
    tokenizer = load_tokenizer(base, cfg.generator.trust_remote_code)
    bf16 = _use_bf16(str(sft.bf16), device)
    import torch

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32,
                                                 trust_remote_code=cfg.generator.trust_remote_code)
    ckpt_dir = ckpt_root / key
    args = TRLSFTConfig(
        output_dir=str(ckpt_dir),
        num_train_epochs=sft.epochs,
        learning_rate=sft.learning_rate,
        per_device_train_batch_size=sft.batch_size,
        gradient_accumulation_steps=sft.grad_accum,
        warmup_steps=sft.warmup_ratio,
        lr_scheduler_type="linear",
        max_length=sft.max_length,
        completion_only_loss=True,
        packing=False,
        bf16=bf16,
        activation_checkpointing=sft.gradient_checkpointing,
        use_cpu=device == "cpu",
        save_strategy="steps",
        save_steps=sft.save_steps,
        save_total_limit=1,
        save_only_model=False,
        logging_steps=1,
        report_to=[] if sft.report_to == "none" else [sft.report_to],
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_liger_kernel=False,
    )

    class ToMetrics(TrainerCallback):
        """Namespaced metrics to metrics.jsonl, and tokens/s on the training progress bar."""

        t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return
            if "num_tokens" in logs:
                logs["tokens_per_s"] = round(float(logs["num_tokens"]) / max(time.time() - self.t0, 1e-9), 1)
                bar = next((getattr(c, "training_bar", None) for c in trainer.callback_handler.callbacks
                            if getattr(c, "training_bar", None) is not None), None)
                if bar is not None:
                    bar.set_postfix(tok_s=logs["tokens_per_s"], loss=logs.get("loss"))
            metrics.log({f"sl/train/{k}": v for k, v in logs.items()}, step=state.global_step)

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[ToMetrics()])
    last = _last_checkpoint(ckpt_dir)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.time() - start
    if not math.isfinite(result.training_loss):
        raise CaiError(f"SFT loss became {result.training_loss}; no model was saved (checkpoints in {ckpt_dir})")
    n_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) * max(sft.epochs, 1)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card)
    summary = {"key": key, "base": base.identity, "examples": len(ds), "steps": result.global_step,
               "train_loss": result.training_loss, "seconds": round(seconds, 1), "train_tokens": n_tokens,
               "resumed_from": str(last) if last else None}
    write_atomic(tmp / TRAIN_INFO, json.dumps(summary, indent=1))
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    metrics.log({"sl/train/seconds": seconds, "sl/train/tokens_per_s": n_tokens / max(seconds, 1e-9),
                 "sl/train/final_loss": result.training_loss})
    return summary


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.exists():
        return None
    ckpts = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    # a checkpoint is complete once the trainer state is written (it is written last)
    done = [c for c in ckpts if (c / "trainer_state.json").exists()]
    return done[-1] if done else None
