"""The preference model (PM): a scalar head on a causal LM, trained on soft AI-feedback labels.

Bai et al. 2022, "Constitutional AI", section 4.1 https://arxiv.org/abs/2212.08073: the PM is trained on
comparisons whose label is the feedback model's probability that one answer is better, not a hard 0/1.
We drive TRL's RewardTrainer (tokenization, batching, checkpoints) and change two things:

- the loss is the soft-label Bradley-Terry loss (`cai.losses.soft_bt_loss`), with the label carried
  through TRL's dataset pipeline and collator as a `soft_label` column;
- the reward is read at the last real token by the attention mask (`pm_rewards`). transformers looks for the
  last token that is not the pad id, but SmolLM2's pad id is its EOS (`<|im_end|>`), so a sequence that
  ends in EOS would be read one token early.

The trained PM is keyed by (comparisons, base model identity, PM settings, seed); a killed run resumes from
its last checkpoint under `<ckpt_root>/<key>/`, as in `cai.train.sft`.

Length correction (`pm.length_correction`, on by default): contrast pairs often have the longer answer as the
chosen one (a helpful answer against a one-line needless refusal), and a PM learns "longer is better" from that
as readily as what the answers say. After training, the reward's least-squares slope in answer tokens is fitted
on the training answers and saved with the model (cai_train.json `length_correction`); `load_pm` reads it and
`score_answers` subtracts slope x tokens from every reward. Regression-based length control as in Dubois et al.
2024 (length-controlled AlpacaEval) and Singhal et al. 2023 ("A Long Way to Go: Investigating Length
Correlations in RLHF"); docs/RESULTS.md section 8 measured what it changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from trl import RewardConfig, RewardTrainer

from cai.backends.transformers_backend import configure_cpu_threads
from cai.config import PMConfig, key_dict  # noqa: F401  (this trainer's settings)
from cai.errors import CaiError, NonFiniteError
from cai.losses import check_finite, soft_bt_loss
from cai.models import ModelRef, load_tokenizer, pick_device, pick_dtype, safetensors_only
from cai.prompts import load_labeled_set
from cai.records import calibration_bins, expected_calibration_error, stable_hash
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
    with_lora,
)


def pm_training_key(comparisons_sha: str, base: ModelRef, cfg, seed: int) -> str:
    """Same shape as cai.train.common.training_key, given the sha256 hex of the comparisons file."""
    return stable_hash({"data": comparisons_sha, "base": base.identity, "settings": _as_dict(cfg), "seed": seed})


def _as_dict(cfg) -> dict:
    """The settings as plain data (a PMConfig or an OmegaConf node); a `lora` section that is off is left out,
    and so is `length_correction` when off, so PMs trained before it existed keep their keys."""
    out = key_dict(cfg)
    if not out.get("length_correction", False):
        out.pop("length_correction", None)
    return out


# --- comparisons -> dataset ------------------------------------------------------------------------------


def check_comparisons(comparisons: list[dict]) -> None:
    """Each record needs key, prompt, answer_a, answer_b (str) and soft_label in [0, 1]; keys are unique."""
    seen = set()
    for i, rec in enumerate(comparisons):
        where = f"comparisons[{i}]" + (f" (key={rec['key']})" if isinstance(rec, dict) and "key" in rec else "")
        if not isinstance(rec, dict):
            raise CaiError(f"{where}: expected an object, got {type(rec).__name__}")
        for name in ("key", "prompt", "answer_a", "answer_b"):
            if not isinstance(rec.get(name), str):
                raise CaiError(f"{where}: field '{name}' must be a string, got {rec.get(name)!r}")
        p = rec.get("soft_label")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise CaiError(f"{where}: field 'soft_label' must be a number in [0, 1] (P(answer_a better)), got {p!r}")
        if rec["key"] in seen:
            raise CaiError(f"{where}: duplicate key; each comparison needs its own key")
        seen.add(rec["key"])


def is_heldout(key: str, eval_fraction: float) -> bool:
    """Held out iff the key's hash falls below eval_fraction: stable as comparisons are added, seed-independent."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8 < eval_fraction


def split_comparisons(comparisons: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    train = [c for c in comparisons if not is_heldout(c["key"], eval_fraction)]
    heldout = [c for c in comparisons if is_heldout(c["key"], eval_fraction)]
    return train, heldout


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def comparisons_dataset(comparisons: list[dict]):
    """Conversational `chosen`/`rejected` (chosen = answer with P >= 0.5) and soft_label = P(chosen better)."""
    import datasets

    rows = []
    for c in comparisons:
        p = float(c["soft_label"])
        chosen, rejected = (c["answer_a"], c["answer_b"]) if p >= 0.5 else (c["answer_b"], c["answer_a"])
        rows.append({"chosen": conversation(c["prompt"], chosen), "rejected": conversation(c["prompt"], rejected),
                     "soft_label": max(p, 1 - p)})
    return datasets.Dataset.from_list(rows)


# --- rewards ---------------------------------------------------------------------------------------------


def pm_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score-head output at each row's last real token. Shape: input_ids, attention_mask (b, t) -> (b,) float32.

    The last real token is the last 1 in the attention mask (right or left padding), never a search for the pad
    id: with pad == eos a sequence ending in EOS would be read one token early. Position ids count real tokens
    only, so a left-padded row gets the same positions as when run alone.

    The model is called whole, and a hook keeps its backbone's last hidden state: under `accelerate launch` it
    is wrapped (DDP), and only its own forward synchronizes the gradients across processes.
    """
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    if hasattr(inner, "get_base_model"):  # LoRA (a PeftModel): the head and backbone of the model it wraps
        inner = inner.get_base_model()
    score = getattr(inner, "score", None)
    if score is None:
        raise CaiError(f"{type(inner).__name__} has no `score` head; expected an AutoModelForSequenceClassification")
    mask = attention_mask.long()
    t = mask.shape[1]
    # the last index where mask == 1: position weights 1..t make the last unmasked one the largest
    last = (mask * torch.arange(1, t + 1, device=mask.device)).argmax(dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    kept = []
    hook = inner.base_model.register_forward_hook(lambda module, args, out: kept.append(out[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        hook.remove()
    hidden = kept[0]  # (b, t, hidden): the backbone's last hidden state
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    return score(picked).squeeze(-1).float()


@dataclass
class SoftLabelCollator:
    """TRL's preference collator (chosen rows, then rejected rows), plus `soft_label` (b,) float32."""

    base: object

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.base(examples)
        batch["soft_label"] = torch.tensor([float(ex["soft_label"]) for ex in examples], dtype=torch.float32)
        return batch


class SoftLabelRewardTrainer(RewardTrainer):
    """RewardTrainer with soft labels (kept through the dataset and collator) and mask-based reward reading."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = SoftLabelCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # chosen_ids, rejected_ids, margin
        if "soft_label" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "soft_label"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # accelerate applies mixed precision by wrapping model.forward; we call the body and head directly
        with self.accelerator.autocast():
            rewards = pm_rewards(model, inputs["input_ids"], inputs["attention_mask"])
        rewards_chosen, rewards_rejected = torch.chunk(rewards, chunks=2)
        loss = soft_bt_loss(rewards_chosen, rewards_rejected, inputs["soft_label"])
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        try:
            check_finite("PM loss", loss.detach())
        except FloatingPointError as e:
            # stop before the optimizer step spreads it into every weight; the last checkpoint stays good
            raise NonFiniteError(f"{e} at step {self.state.global_step}; no model was saved "
                           f"(checkpoints in {self.args.output_dir})") from None

        # the parent's metrics, averaged per logging step by RewardTrainer.log
        if mode == "train":
            n_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            all_rewards = self.accelerator.gather(rewards)
            self._metrics[mode]["min_reward"].append(all_rewards.min().item())
            self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
            self._metrics[mode]["max_reward"].append(all_rewards.max().item())
            accuracy = (rewards_chosen > rewards_rejected).float().mean()
            self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
            margin = (rewards_chosen - rewards_rejected).mean()
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
            self._metrics[mode]["soft_label"].append(inputs["soft_label"].mean().item())
        return (loss, {"rewards": rewards}) if return_outputs else loss


# --- training --------------------------------------------------------------------------------------------


def init_pm(base: ModelRef, tokenizer, seed: int, trust_remote_code: bool = False):
    """The base causal LM with a fresh scalar head (seeded), fp32 master weights, pad id from the tokenizer."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    set_seed(seed)  # the score head is randomly initialized
    with suppress_seqcls_warning():  # "score.weight newly initialized" is expected here
        model = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=1, dtype=torch.float32,
                                                                   trust_remote_code=trust_remote_code,
                                                                   **safetensors_only())
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def reward_config(cfg, seed: int, output_dir: Path, device: str, progress: bool = True) -> RewardConfig:
    return RewardConfig(**common_args(cfg, output_dir, device, seed, progress), max_length=cfg.max_length,
                        center_rewards_coefficient=cfg.center_rewards_coefficient, save_only_model=False,
                        eval_strategy="no")  # held-out evaluation is evaluate_pm, after training


def train_pm(comparisons: list[dict], base: ModelRef, cfg, seed: int, out_dir: Path, ckpt_root: Path,
             metrics: Metrics, key: str, device: str = "auto", progress: bool = True,
             trust_remote_code: bool = False) -> dict:
    """Train on the comparisons not held out; evaluate on the rest; save safetensors + tokenizer to out_dir."""
    import datasets


    configure_cpu_threads()
    datasets.disable_progress_bars()
    device = pick_device(device)
    check_comparisons(comparisons)
    train_recs, heldout_recs = split_comparisons(comparisons, cfg.eval_fraction)
    if not train_recs:
        raise CaiError(f"pm.eval_fraction={cfg.eval_fraction} holds out all {len(comparisons)} comparisons; "
                       "expected a value that leaves some for training (e.g. 0.1)")
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = with_lora(init_pm(base, tokenizer, seed, trust_remote_code), getattr(cfg, "lora", None), "SEQ_CLS",
                      "pm.lora")
    ckpt_dir = ckpt_root / key

    trainer = SoftLabelRewardTrainer(model=model, args=reward_config(cfg, seed, ckpt_dir, device, progress),
                                     train_dataset=comparisons_dataset(train_recs), processing_class=tokenizer,
                                     callbacks=[finite_callback("PM", ckpt_dir),
                                                metrics_callback(metrics, "rl/pm/train", lambda: trainer)])
    n_train = len(trainer.train_dataset)
    if n_train == 0:
        raise CaiError(f"all {len(train_recs)} training comparisons are longer than pm.max_length={cfg.max_length} "
                       "tokens on one side (TRL drops those); raise pm.max_length")
    last = last_checkpoint(ckpt_dir)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.time() - start
    if not math.isfinite(result.training_loss):
        raise CaiError(f"PM loss became {result.training_loss}; no model was saved (checkpoints in {ckpt_dir})")

    correction = fit_length_correction(trainer.model, tokenizer, train_recs, 2 * cfg.batch_size)
    correction["enabled"] = bool(getattr(cfg, "length_correction", False))
    clear = clear_raw = None
    if cfg.clear_pairs:
        trained_prompts = {c["prompt"] for c in train_recs}
        rows = load_labeled_set(cfg.clear_pairs)
        clear_raw = clear_pair_accuracy(trainer.model, tokenizer, rows, trained_prompts, batch_size=2 * cfg.batch_size)
    heldout_raw = evaluate_pm(trainer.model, tokenizer, heldout_recs, batch_size=2 * cfg.batch_size) \
        if correction["enabled"] else None
    set_length_slope(trainer.model, correction)
    heldout = evaluate_pm(trainer.model, tokenizer, heldout_recs, batch_size=2 * cfg.batch_size)
    if cfg.clear_pairs:
        clear = clear_pair_accuracy(trainer.model, tokenizer, rows, trained_prompts, batch_size=2 * cfg.batch_size) \
            if correction["enabled"] else clear_raw
    summary = {"key": key, "base": base.identity, "seed": seed, "pm": _as_dict(cfg),
               "counts": {"comparisons": len(comparisons), "train": n_train,
                          "train_too_long": len(train_recs) - n_train, "heldout": len(heldout_recs)},
               "steps": result.global_step, "train_loss": result.training_loss, "seconds": round(seconds, 1),
               "resumed_from": str(last) if last else None, "heldout": heldout, "clear_pairs": clear,
               "clear_pairs_uncorrected": clear_raw if correction["enabled"] else None,
               "heldout_accuracy_uncorrected": heldout_raw["accuracy"] if heldout_raw else None,
               "length_correction": correction,
               "lora": bool(getattr(cfg, "lora", None) and cfg.lora.enabled)}

    card = (f"# cai preference model\n\nScalar head on {base.identity}, trained on {n_train} comparisons with soft "
            f"labels (Constitutional AI, section 4.1). Held-out accuracy: {heldout['accuracy']}. Key: {key}.\n")
    save_trained(trainer, tokenizer, out_dir, card, summary, ckpt_dir)
    metrics.log({"rl/pm/train/seconds": seconds, "rl/pm/train/final_loss": result.training_loss,
                 **{f"rl/pm/heldout/{k}": v for k, v in heldout.items() if k != "calibration"},
                 **({f"rl/pm/clear_pairs/{k}": v for k, v in clear.items() if not isinstance(v, dict)} if clear else {})})
    return summary


# --- evaluation and scoring ------------------------------------------------------------------------------


def evaluate_pm(model, tokenizer, comparisons: list[dict], batch_size: int = 16, n_bins: int = 10) -> dict:
    """Held-out accuracy, soft loss and calibration of P(A better) = sigmoid(r_a - r_b) against the soft labels.

    accuracy: share of comparisons where the PM prefers the answer the label prefers (soft_label > 0.5 means A);
    ties at exactly 0.5 have no majority and are left out. calibration: equal-width bins of the predicted
    P(A better), each with its count, mean prediction and mean soft label (a calibrated PM has them equal);
    ece is the count-weighted mean gap.
    """
    n = len(comparisons)
    if n == 0:
        return {"count": 0, "decisive": 0, "accuracy": None, "loss": None, "ece": None, "calibration": []}
    prompts = [c["prompt"] for c in comparisons]
    rewards = score_answers(model, tokenizer, prompts + prompts,
                            [c["answer_a"] for c in comparisons] + [c["answer_b"] for c in comparisons], batch_size)
    r_a, r_b = torch.tensor(rewards[:n]), torch.tensor(rewards[n:])
    labels = torch.tensor([float(c["soft_label"]) for c in comparisons])
    predicted = torch.sigmoid(r_a - r_b)
    decisive = labels != 0.5
    agree = ((r_a > r_b) == (labels > 0.5))[decisive]
    calibration = calibration_bins(predicted.tolist(), labels.tolist(), n_bins)
    ece = expected_calibration_error(calibration)
    return {"count": n, "decisive": int(decisive.sum()),
            "accuracy": agree.float().mean().item() if agree.numel() else None,
            "loss": soft_bt_loss(r_a, r_b, labels).item(), "mean_abs_margin": (r_a - r_b).abs().mean().item(),
            "ece": ece, "calibration": calibration}


def clear_pair_accuracy(model, tokenizer, rows: list[dict], trained_prompts: set[str] = frozenset(),
                        batch_size: int = 16) -> dict:
    """Share of clear pairs (a known better and worse answer) where the PM scores the better answer higher, overall
    and per category; pairs whose prompt the PM trained on are left out (counted in `left_out`). Chance is 0.5."""
    kept = [r for r in rows if r["prompt"] not in trained_prompts]
    if not kept:
        return clear_pair_stats([], [], [], len(rows))
    n = len(kept)
    scores = score_answers(model, tokenizer, [r["prompt"] for r in kept] * 2, [r["better"] for r in kept] +
                           [r["worse"] for r in kept], batch_size)
    return clear_pair_stats(kept, scores[:n], scores[n:], len(rows) - len(kept))


def load_pm(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """A saved PM and its tokenizer, in eval mode on the device. Returns (model, tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise CaiError(f"{path}: no config.json; expected a preference model saved by the PM stage")
    device = pick_device(device)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=pick_dtype(dtype, device),
                                                               **safetensors_only())
    if model.config.num_labels != 1:
        raise CaiError(f"{path}: model has num_labels={model.config.num_labels}; a preference model has 1")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = json.loads((path / TRAIN_INFO).read_text()) if (path / TRAIN_INFO).exists() else {}
    set_length_slope(model, info.get("length_correction"))
    return model.to(device).train(False), tokenizer


def score_answers(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 16) -> list[float]:
    """PM reward of each (prompt, answer) as a [user, assistant] chat, less the PM's length trend where it has one
    (`set_length_slope`). Right-padded, length-sorted batches."""
    if len(prompts) != len(answers):
        raise ValueError(f"score_answers: {len(prompts)} prompts but {len(answers)} answers")
    # tokenized exactly as TRL tokenizes the training conversations (trl.data_utils._tokenize)
    rows = [tokenizer.apply_chat_template(conversation(p, a), tokenize=True, return_dict=True)["input_ids"]
            for p, a in zip(prompts, answers)]
    device = next(model.parameters()).device
    out = [0.0] * len(rows)
    was_training = model.training
    model.train(False)
    try:
        with torch.inference_mode():
            for idx, ids, mask in padded_batches(rows, batch_size, tokenizer.pad_token_id):
                for i, r in zip(idx, pm_rewards(model, ids.to(device), mask.to(device)).tolist()):
                    out[i] = r
    finally:
        model.train(was_training)
    slope = getattr(model, "cai_length_slope", 0.0)
    if slope:
        out = [r - slope * n for r, n in zip(out, answer_tokens(tokenizer, answers))]
    return out


# --- length correction -----------------------------------------------------------------------------------


def answer_tokens(tokenizer, answers: list[str]) -> list[int]:
    """Tokens of each answer's text alone (no chat template): the length the correction is linear in."""
    return [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]


def fit_length_correction(model, tokenizer, comparisons: list[dict], batch_size: int = 16) -> dict:
    """The least-squares slope of the PM's (uncorrected) reward in answer tokens, over both answers of the
    comparisons it trained on, and their correlation: {slope, corr, answers}. Slope 0 where lengths do not vary."""
    prompts = [c["prompt"] for c in comparisons] * 2
    answers = [c["answer_a"] for c in comparisons] + [c["answer_b"] for c in comparisons]
    saved, model.cai_length_slope = getattr(model, "cai_length_slope", 0.0), 0.0
    try:
        r = torch.tensor(score_answers(model, tokenizer, prompts, answers, batch_size), dtype=torch.float64)
    finally:
        model.cai_length_slope = saved
    n = torch.tensor(answer_tokens(tokenizer, answers), dtype=torch.float64)
    dn, dr = n - n.mean(), r - r.mean()
    var_n, var_r = (dn * dn).sum().item(), (dr * dr).sum().item()
    slope = (dn * dr).sum().item() / var_n if var_n > 0 else 0.0
    corr = (dn * dr).sum().item() / math.sqrt(var_n * var_r) if var_n > 0 and var_r > 0 else 0.0
    return {"slope": slope, "corr": corr, "answers": len(answers)}


def set_length_slope(model, correction: dict | None) -> None:
    """Make `score_answers` subtract the fitted length trend (when the correction is enabled), or nothing."""
    model.cai_length_slope = float(correction["slope"]) if correction and correction.get("enabled") else 0.0
