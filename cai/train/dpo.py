"""Offline preference optimization on labeled pairs with TRL's DPOTrainer (Rafailov et al. 2023).

The offline alternative to online PPO: the preferred answer is the one with soft label > 0.5; pairs whose label
is within `margin` of 0.5 carry too little signal and are dropped. The reference model is the starting (SL-CAI)
model, as in PPO's KL penalty.

A DPO policy is its own reward model: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023,
section 5). `clear_pair_check` ranks the clear pairs (a known better answer) by that implicit reward, on the
prompts DPO never trained on, so a DPO run reports the number a PPO run's preference model reports (chance 0.5),
beside how the starting model's and the policy's own likelihoods rank the same pairs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from pathlib import Path

from cai.backends.transformers_backend import configure_cpu_threads
from cai.config import DPOConfig, key_dict
from cai.errors import CaiError
from cai.io import write_atomic
from cai.launch import is_main
from cai.losses import logprobs_from_logits
from cai.models import ModelRef, load_causal_lm, load_tokenizer, pick_device, resolve_model, safetensors_only
from cai.store import Metrics
from cai.train.common import (
    TRAIN_INFO,
    clear_pair_stats,
    common_args,
    finite_callback,
    last_checkpoint,
    metrics_callback,
    padded_batches,
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


CHECK_VERSION = 1  # what `clear_pair_check` measures; a saved check of another version is done again


def train_dpo(comparisons: list[dict], base: ModelRef, cfg: DPOConfig, seed: int, out_dir: Path, ckpt_root: Path,
              metrics: Metrics, card: str, device: str = "auto", progress: bool = True,
              trust_remote_code: bool = False, clear: list[dict] | None = None) -> dict:
    """DPO from `base` on the comparisons -> a merged safetensors model in out_dir (reused when its key matches).
    clear: clear pairs (cai.prompts.load_labeled_set) for `clear_pair_check`, run on the main process after
    training (and on a reused model that lacks it for these pairs); the result is the summary's `clear_pairs`."""
    summary = _train_dpo(comparisons, base, cfg, seed, out_dir, ckpt_root, metrics, card, device, progress,
                         trust_remote_code)
    if clear and is_main():
        pairs = preference_pairs(comparisons, cfg.margin)
        digest = hashlib.sha256(json.dumps([CHECK_VERSION, clear], sort_keys=True).encode()).hexdigest()[:16]
        if (summary.get("clear_pairs") or {}).get("pairs_digest") != digest:
            gc.collect()  # the trainer is gone: one model at a time from here
            trained = {p["prompt"][0]["content"] for p in pairs}
            result = clear_pair_check(base, resolve_model(str(out_dir)), clear, trained, cfg.beta, device,
                                      trust_remote_code, batch_size=2 * cfg.batch_size, progress=progress)
            summary["clear_pairs"] = {**result, "pairs_digest": digest}
            info = {k: v for k, v in summary.items() if k != "reused"}
            write_atomic(out_dir / TRAIN_INFO, json.dumps(info, indent=1))
            metrics.log({f"rl/dpo/clear_pairs/{k}": v for k, v in result.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return summary


def _train_dpo(comparisons: list[dict], base: ModelRef, cfg: DPOConfig, seed: int, out_dir: Path, ckpt_root: Path,
               metrics: Metrics, card: str, device: str, progress: bool, trust_remote_code: bool) -> dict:
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
    # clear_pairs only checks the trained model (redone when they change): not part of what makes it
    settings = {k: v for k, v in key_dict(cfg).items() if k != "clear_pairs"}
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


# --- the implicit reward on clear pairs -----------------------------------------------------------------------


def answer_logprobs(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 8,
                    bar=None) -> list[list[float]]:
    """log pi(token | what precedes it) for each token of each answer, for each (prompt, answer) as a [user,
    assistant] chat, tokenized as TRL's DPOTrainer tokenizes conversational pairs: the prompt with the generation
    prompt, the answer from where the whole chat's tokens part from it (its end-of-turn tokens included); their
    sum is log pi(answer | prompt). Right-padded, length-sorted batches."""
    import torch

    if len(prompts) != len(answers):
        raise ValueError(f"answer_logprobs: {len(prompts)} prompts but {len(answers)} answers")
    rows, starts = [], []
    for p, a in zip(prompts, answers):
        head = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                             tokenize=True, return_dict=True)["input_ids"]
        start = next((i for i, (x, y) in enumerate(zip(head, full)) if x != y), min(len(head), len(full)))
        rows.append(full)
        starts.append(max(start, 1))  # the first token has no prediction
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in rows]
    model.train(False)
    with torch.inference_mode():
        for idx, ids, mask in padded_batches(rows, batch_size, tokenizer.pad_token_id):
            scored = torch.zeros((len(idx), ids.shape[1] - 1), dtype=torch.bool)
            for j, i in enumerate(idx):
                scored[j, starts[i] - 1:len(rows[i]) - 1] = True  # position t predicts token t + 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            logp = logprobs_from_logits(logits, ids[:, 1:].to(device)).cpu()
            for j, i in enumerate(idx):
                out[i] = logp[j][scored[j]].tolist()
            if bar is not None:
                bar.update(len(idx))
    return out


def clear_pair_check(reference: ModelRef, policy: ModelRef, rows: list[dict], trained_prompts: set[str], beta: float,
                     device: str = "auto", trust_remote_code: bool = False, batch_size: int = 8,
                     progress: bool = False) -> dict:
    """How a DPO policy's implicit reward beta * (log pi - log pi_ref) ranks clear pairs (rows {category, prompt,
    better, worse}) whose prompt DPO never trained on: `clear_pair_stats` of it (accuracy, chance 0.5; mean
    margin in reward units), plus `start_likelihood_accuracy` and `policy_likelihood_accuracy`, the share where
    the starting model's (the reference's) and the policy's own log-likelihood is higher for the better answer.

    The implicit reward is a sum over the answer's tokens, so a policy whose log-probs drift down (or up) on
    most text ranks pairs by length alone; `by_length` (from `clear_pair_stats`) shows it, and the bundled clear
    set has as many pairs whose better answer is the shorter as the longer. The two models are loaded in float32
    one after the other."""
    kept = [r for r in rows if r["prompt"] not in trained_prompts]
    if not kept:
        return {**clear_pair_stats([], [], [], len(rows)), "start_likelihood_accuracy": None,
                "policy_likelihood_accuracy": None}
    n = len(kept)
    prompts, answers = [r["prompt"] for r in kept] * 2, [r["better"] for r in kept] + [r["worse"] for r in kept]
    from tqdm import tqdm

    logps = []
    with tqdm(total=4 * n, desc="dpo clear pairs", unit="answer", disable=not progress) as bar:
        for ref in (reference, policy):
            tokenizer = load_tokenizer(ref, trust_remote_code)
            model = load_causal_lm(ref, dtype="float32", device=device, trust_remote_code=trust_remote_code)
            logps.append(answer_logprobs(model, tokenizer, prompts, answers, batch_size, bar))
            del model
            gc.collect()
    ref_lp, pol_lp = [sum(x) for x in logps[0]], [sum(x) for x in logps[1]]
    reward = [beta * (p - r) for p, r in zip(pol_lp, ref_lp)]
    out = clear_pair_stats(kept, reward[:n], reward[n:], len(rows) - n)
    out["start_likelihood_accuracy"] = sum(ref_lp[i] > ref_lp[n + i] for i in range(n)) / n
    out["policy_likelihood_accuracy"] = sum(pol_lp[i] > pol_lp[n + i] for i in range(n)) / n
    return out
