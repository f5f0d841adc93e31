"""Supervised fine-tuning of the SL-CAI model with TRL's SFTTrainer (loss on the assistant turn only).

The trained model is keyed by (SFT data, base model identity, SFT settings): a rerun with the same key reuses
the saved model; a killed run resumes from its last checkpoint under `sl/checkpoints/<key>/`.

`sft.method=crlft` is C-RLFT (OpenChat, Wang et al. 2023, arXiv 2309.11235): each example's source (human,
revision, contrast, helpful, initial) becomes a condition at the start of its system turn, and the source's coarse
reward weights its loss (class-conditioned, reward-weighted SFT). The saved tokenizer's chat template puts the best
source's condition into every conversation, so whatever renders prompts with the model's template (the backends,
PPO, the TRL trainers, `cai.serve`) answers under that condition.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cai.backends.transformers_backend import configure_cpu_threads
from cai.config import key_dict
from cai.errors import CaiError
from cai.io import read_jsonl
from cai.models import ModelRef, load_tokenizer, pick_device, safetensors_only
from cai.store import Metrics
from cai.templates import load_template
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
    settings = key_dict(sft_cfg)
    if sft_cfg.method == "crlft":  # the condition's text is part of what is trained
        settings["crlft_condition"] = load_template(sft_cfg.crlft.condition_template).text
    else:
        settings.pop("crlft", None)  # plain SFT does not read these: editing them retrains nothing
    return training_key(sft_path.read_bytes(), base, settings, seed)


# --- C-RLFT ------------------------------------------------------------------------------------------------


def crlft_weights(sources: list[str], rewards: dict, normalize: bool = True) -> list[float]:
    """Each example's loss weight: its source's reward, scaled (normalize) so the mean over `sources` is 1."""
    raw = [float(rewards.get(s, 0.0)) for s in sources]
    mean = sum(raw) / len(raw) if raw else 0.0
    if not normalize or mean <= 0:
        return raw
    return [r / mean for r in raw]


def best_source(sources: set[str], rewards: dict, generate_with: str = "") -> str:
    """The source the model answers under: `generate_with`, else the highest reward among the sources present."""
    if generate_with:
        return generate_with
    present = sorted((s for s in sources if rewards.get(s, 0) > 0), key=lambda s: (-rewards[s], s))
    if not present:
        raise CaiError("sft.method=crlft: no SFT example comes from a source with a reward > 0 (sft.crlft.rewards)")
    top = [s for s in present if rewards[s] == rewards[present[0]]]
    if len(top) > 1:
        raise CaiError(f"sft.crlft.rewards: sources {top} tie for the highest reward; set sft.crlft.generate_with "
                       "to the one the model should answer under")
    return present[0]


def condition_messages(messages: list[dict], condition: str) -> list[dict]:
    """The condition at the start of the system turn (a system turn of its own when there is none). The chat
    template of `conditioned_chat_template` does the same, so training and generation see the same text."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": condition + "\n" + messages[0]["content"]}] + list(messages[1:])
    return [{"role": "system", "content": condition}] + list(messages)


def conditioned_chat_template(template: str, condition: str) -> str:
    """`template` preceded by Jinja that applies `condition_messages` to the conversation it renders."""
    lit = json.dumps(condition)  # a JSON string literal is a valid Jinja string literal
    return ("{% if messages and messages[0]['role'] == 'system' %}"
            "{% set messages = [{'role': 'system', 'content': " + lit + " + '\n' + messages[0]['content']}]"
            " + messages[1:] %}"
            "{% else %}{% set messages = [{'role': 'system', 'content': " + lit + "}] + messages %}{% endif %}"
            + template)


def crlft_dataset(rows: list[dict], crlft_cfg):
    """The SFT rows -> (prompt with its source's condition, completion, weight) for the sources with a reward > 0;
    returns (dataset, the generation source, its condition, examples and weight per source)."""
    import datasets

    template = load_template(crlft_cfg.condition_template)
    kept = [r for r in rows if crlft_cfg.rewards.get(r["source"], 0) > 0]
    if not kept:
        raise CaiError("sft.method=crlft: no SFT example comes from a source with a reward > 0 (sft.crlft.rewards)")
    weights = crlft_weights([r["source"] for r in kept], crlft_cfg.rewards, crlft_cfg.normalize)
    best = best_source({r["source"] for r in kept}, crlft_cfg.rewards, crlft_cfg.generate_with)
    data = {"prompt": [condition_messages(r["prompt"], template.render(source=r["source"])) for r in kept],
            "completion": [r["completion"] for r in kept], "weight": weights}
    per_source = {}
    for r, w in zip(kept, weights):
        per_source.setdefault(r["source"], {"examples": 0, "weight": round(w, 6)})["examples"] += 1
    return datasets.Dataset.from_dict(data), best, template.render(source=best), per_source


class _WeightedRows:
    """`model(**inputs)` whose per-token log-probs (TRL's fused LM head) are scaled by each row's weight: SFTTrainer's
    loss, sum(-log p) / tokens, becomes sum_i w_i * sum_t(-log p_it) / tokens."""

    def __init__(self, model, weights):
        self.model, self.weights = model, weights

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        if kwargs.get("fused_lm_head"):
            out.log_probs = out.log_probs * self.weights.to(out.log_probs.dtype)[:, None]
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def weighted_sft_trainer_class():
    """SFTTrainer with a per-example loss weight (the dataset's `weight` column)."""
    import torch
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "weight" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("weight")
            if self.args.loss_type != "nll" or self.compute_loss_func is not None or self.label_smoother is not None:
                raise CaiError("sft.method=crlft weights the plain NLL loss only")
            return super().compute_loss(_WeightedRows(model, weights), inputs, return_outputs, num_items_in_batch)

    def collate_with(inner):
        def collate(examples):
            out = inner([{k: v for k, v in e.items() if k != "weight"} for e in examples])
            out["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
            return out
        return collate

    return WeightedSFTTrainer, collate_with


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
    tokenizer = load_tokenizer(base, cfg.generator.trust_remote_code)
    crlft = None
    if sft.method == "crlft":
        ds, source, condition, per_source = crlft_dataset(read_jsonl(sft_path), sft.crlft)
        crlft = {"generate_with": source, "condition": condition, "sources": per_source}
        trainer_cls, collate_with = weighted_sft_trainer_class()
    else:
        ds = datasets.load_dataset("json", data_files=str(sft_path), split="train").select_columns(["prompt",
                                                                                                     "completion"])
        trainer_cls = SFTTrainer
    import torch

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, **safetensors_only(),
                                                 trust_remote_code=cfg.generator.trust_remote_code)
    model = with_lora(model, sft.lora, "CAUSAL_LM", "sft.lora")
    ckpt_dir = ckpt_root / key
    args = TRLSFTConfig(**common_args(sft, ckpt_dir, device, cfg.seed, progress), max_length=sft.max_length,
                        completion_only_loss=True, packing=False, use_liger_kernel=False)
    trainer = trainer_cls(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                          callbacks=[finite_callback("SFT", ckpt_dir),
                                     metrics_callback(metrics, "sl/train", lambda: trainer)])
    if crlft is not None:
        trainer.data_collator = collate_with(trainer.data_collator)
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
    if crlft is not None:  # the published model answers under the best source's condition
        summary["crlft"] = crlft
        if not isinstance(tokenizer.chat_template, str):
            raise CaiError(f"sft.method=crlft: {base.name}'s tokenizer has several chat templates; C-RLFT needs one "
                           "to put the condition into")
        tokenizer.chat_template = conditioned_chat_template(tokenizer.chat_template, condition)
    save_trained(trainer, tokenizer, out_dir, model_card, summary, ckpt_dir)
    metrics.log({"sl/train/seconds": seconds, "sl/train/tokens_per_s": n_tokens / max(seconds, 1e-9),
                 "sl/train/final_loss": result.training_loss})
    return summary
