"""Supervised fine-tuning of the SL-CAI model with TRL's SFTTrainer (loss on the assistant turn only).

The trained model is keyed by (SFT data, base model identity, SFT settings): a rerun with the same key reuses
the saved model; a killed run resumes from its last checkpoint under `sl/checkpoints/<key>/`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cai.backends.transformers_backend import configure_cpu_threads
from cai.config import key_dict
from cai.errors import CaiError
from cai.models import ModelRef, load_tokenizer, pick_device, safetensors_only
from cai.store import Metrics
from cai.train.common import (
    common_args,
    finite_callback,
    last_checkpoint,
    metrics_callback,
    save_trained,
    training_key,
    with_lora,
)


def sft_training_key(sft_path: Path, base: ModelRef, sft_cfg, seed: int) -> str:
    return training_key(sft_path.read_bytes(), base, key_dict(sft_cfg), seed)


def train_sft(sft_path: Path, base: ModelRef, cfg, out_dir: Path, ckpt_root: Path, metrics: Metrics,
              model_card: str, key: str, device: str = "auto", progress: bool = True) -> dict:
    """Train on `sft_path` (prompt/completion conversations) and save safetensors + tokenizer + card to out_dir."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer


    configure_cpu_threads()
    datasets.disable_progress_bars()
    device = pick_device(device)
    sft = cfg.sft
    ds = datasets.load_dataset("json", data_files=str(sft_path), split="train").select_columns(["prompt", "completion"])
    tokenizer = load_tokenizer(base, cfg.generator.trust_remote_code)
    import torch

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, **safetensors_only(),
                                                 trust_remote_code=cfg.generator.trust_remote_code)
    model = with_lora(model, sft.lora, "CAUSAL_LM", "sft.lora")
    ckpt_dir = ckpt_root / key
    args = TRLSFTConfig(**common_args(sft, ckpt_dir, device, cfg.seed, progress), max_length=sft.max_length,
                        completion_only_loss=True, packing=False, use_liger_kernel=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         callbacks=[finite_callback("SFT", ckpt_dir),
                                    metrics_callback(metrics, "sl/train", lambda: trainer)])
    last = last_checkpoint(ckpt_dir)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.time() - start
    if not math.isfinite(result.training_loss):
        raise CaiError(f"SFT loss became {result.training_loss}; no model was saved (checkpoints in {ckpt_dir})")
    n_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) * max(sft.epochs, 1)

    summary = {"key": key, "base": base.identity, "examples": len(ds), "steps": result.global_step,
               "train_loss": result.training_loss, "seconds": round(seconds, 1), "train_tokens": n_tokens,
               "resumed_from": str(last) if last else None,
               "lora": key_dict(sft.lora) if sft.lora.enabled else None}
    save_trained(trainer, tokenizer, out_dir, model_card, summary, ckpt_dir)
    metrics.log({"sl/train/seconds": seconds, "sl/train/tokens_per_s": n_tokens / max(seconds, 1e-9),
                 "sl/train/final_loss": result.training_loss})
    return summary
