"""RLOO and GRPO through TRL's trainers, rewarded by the same preference model as PPO.

`algorithm=rloo` (Ahmadian et al. 2024) and `algorithm=grpo` (Shao et al. 2024) sample `num_generations`
answers per prompt and use the group's other answers as the baseline instead of a value model; TRL's
trainers do that. The PM is wrapped as a reward function, so all three algorithms optimize the same reward.

The KL anchor is `reference` (the SL-CAI model in every round of stage=rl), not the policy a round starts from:
TRL builds its frozen reference from the policy's `config._name_or_path`, so that is pointed at the reference
while the trainer is built (and put back before anything is saved).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cai.backends.transformers_backend import configure_cpu_threads
from cai.backends.vllm_backend import require_vllm
from cai.config import GroupRLConfig
from cai.errors import CaiError
from cai.models import ModelRef, load_tokenizer, pick_device, safetensors_only
from cai.store import Metrics
from cai.train.common import common_args, finite_callback, last_checkpoint, metrics_callback, save_trained, with_lora


def pm_reward_function(score_fn):
    """TRL reward function (prompts, completions) -> floats, from score_fn(prompt_texts, answer_texts)."""

    def pm_reward(prompts, completions, **kwargs):
        def text(x):
            return x[-1]["content"] if isinstance(x, list) else x

        return [float(r) for r in score_fn([text(p) for p in prompts], [text(c) for c in completions])]

    return pm_reward


def train_group_rl(algorithm: str, policy: ModelRef, score_fn, prompts: list[str], cfg: GroupRLConfig, seed: int,
                   out_dir: Path, metrics: Metrics, key: str, card: str, device: str = "auto", progress: bool = True,
                   trust_remote_code: bool = False, reference: ModelRef | None = None) -> dict:
    """reference: the KL anchor (stage=rl passes the SL-CAI model); None: the starting policy."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM


    configure_cpu_threads()
    datasets.disable_progress_bars()
    device = pick_device(device)
    common = common_args(cfg, out_dir / "checkpoints" / key, device, seed, progress)
    online = dict(num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                  temperature=cfg.temperature, beta=cfg.beta, use_vllm=cfg.use_vllm)
    if cfg.use_vllm:  # vLLM in the trainer's own processes, weights synced from the policy every step
        require_vllm(f"{algorithm}.use_vllm=true")
        online.update(vllm_mode="colocate", vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    if algorithm == "grpo":
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as Trainer
    elif algorithm == "rloo":
        from trl import RLOOConfig as TRLConfig
        from trl import RLOOTrainer as Trainer
    else:
        raise CaiError(f"algorithm={algorithm}: expected ppo, rloo or grpo")
    if cfg.batch_size % cfg.num_generations:
        raise CaiError(f"{algorithm}.batch_size={cfg.batch_size} must be a multiple of "
                       f"{algorithm}.num_generations={cfg.num_generations}")
    tokenizer = load_tokenizer(policy, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(policy.path, dtype=torch.float32, **safetensors_only(), trust_remote_code=trust_remote_code)
    # LoRA: TRL's trainers take the KL reference from the same weights with the adapters disabled
    model = with_lora(model, getattr(cfg, "lora", None), "CAUSAL_LM", f"{algorithm}.lora")
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    own_name = model.config._name_or_path
    model.config._name_or_path = str((reference or policy).path)  # TRL loads its frozen reference from here
    try:
        trainer = Trainer(model=model, reward_funcs=[pm_reward_function(score_fn)],
                          args=TRLConfig(**common, **online), train_dataset=ds, processing_class=tokenizer,
                          callbacks=[finite_callback(algorithm.upper(), out_dir / "checkpoints" / key),
                                     metrics_callback(metrics, f"rl/{algorithm}", lambda: trainer)])
    finally:
        model.config._name_or_path = own_name
    last = last_checkpoint(out_dir / "checkpoints" / key)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if not math.isfinite(result.training_loss):
        raise CaiError(f"{algorithm} loss became {result.training_loss}; no policy was saved")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    summary = {"key": key, "algorithm": algorithm, "base": policy.identity,
               "reference": (reference or policy).identity, "steps": result.global_step,
               "train_loss": result.training_loss, "first_reward": rewards[0] if rewards else None,
               "last_reward": rewards[-1] if rewards else None, "seconds": round(time.time() - start, 1),
               "resumed_from": str(last) if last else None, "lora": bool(getattr(cfg, "lora", None) and cfg.lora.enabled)}
    save_trained(trainer, tokenizer, out_dir / "policy", card, summary, out_dir / "checkpoints" / key)
    return summary
