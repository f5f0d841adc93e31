"""Offline preference optimization on labeled pairs with TRL's DPOTrainer (Rafailov et al. 2023).

The offline alternative to online PPO: the preferred answer is the one with soft label > 0.5; pairs whose label
is within `margin` of 0.5 carry too little signal and are dropped. The reference model is the starting (SL-CAI)
model, as in PPO's KL penalty.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cai.backends.transformers_backend import configure_cpu_threads
from cai.config import DPOConfig, key_dict
from cai.errors import CaiError
from cai.models import ModelRef, load_tokenizer, pick_device, safetensors_only
from cai.store import Metrics
from cai.train.common import (
    common_args,
    finite_callback,
    last_checkpoint,
    metrics_callback,
    save_trained,
    trained_model_matches,
    training_key,
    with_lora,
)


def preference_pairs(comparisons: list[dict], margin: float) -> list[dict]:
    """Conversational prompt/chosen/rejected records from soft-labeled comparisons."""
    out = []
    for c in comparisons:
        p = c["soft_label"]
        if abs(p - 0.5) < margin or c["answer_a"] == c["answer_b"]:
            continue
        chosen, rejected = (c["answer_a"], c["answer_b"]) if p > 0.5 else (c["answer_b"], c["answer_a"])
        out.append({"prompt": [{"role": "user", "content": c["prompt"]}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def train_dpo(comparisons: list[dict], base: ModelRef, cfg: DPOConfig, seed: int, out_dir: Path, ckpt_root: Path,
              metrics: Metrics, card: str, device: str = "auto", progress: bool = True,
              trust_remote_code: bool = False) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer


    configure_cpu_threads()
    datasets.disable_progress_bars()
    device = pick_device(device)
    pairs = preference_pairs(comparisons, cfg.margin)
    if not pairs:
        raise CaiError(f"dpo: no pair has a soft label further than dpo.margin={cfg.margin} from 0.5; "
                       "lower dpo.margin or label more pairs")
    data = json.dumps(pairs, sort_keys=True).encode()
    settings = key_dict(cfg)
    key = training_key(data, base, settings, seed)
    ckpt_dir = ckpt_root / key
    if trained_model_matches(out_dir, key):
        return {**json.loads((out_dir / "cai_train.json").read_text()), "reused": True}
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, **safetensors_only(), trust_remote_code=trust_remote_code)
    # LoRA: TRL's DPOTrainer takes the reference log-probs from the same weights with the adapters disabled
    model = with_lora(model, getattr(cfg, "lora", None), "CAUSAL_LM", "dpo.lora")
    args = TRLDPOConfig(**common_args(cfg, ckpt_dir, device, seed, progress), beta=cfg.beta, loss_type=cfg.loss_type,
                        max_length=cfg.max_length)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                         processing_class=tokenizer, callbacks=[finite_callback("DPO", ckpt_dir),
                                                                 metrics_callback(metrics, "rl/dpo", lambda: trainer)])
    last = last_checkpoint(ckpt_dir)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if not math.isfinite(result.training_loss):
        raise CaiError(f"DPO loss became {result.training_loss}; no model was saved (checkpoints in {ckpt_dir})")
    summary = {"key": key, "base": base.identity, "pairs": len(pairs), "dropped": len(comparisons) - len(pairs),
               "steps": result.global_step, "train_loss": result.training_loss,
               "seconds": round(time.time() - start, 1), "resumed_from": str(last) if last else None,
               "lora": bool(getattr(cfg, "lora", None) and cfg.lora.enabled)}
    save_trained(trainer, tokenizer, out_dir, card, summary, ckpt_dir)
    return summary
