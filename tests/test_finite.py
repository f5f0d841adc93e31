"""A non-finite loss, gradient or weight stops every trainer (SFT, PM, DPO, RLOO, GRPO, PPO) with one line,
before any checkpoint is written and with no model published.

The trigger is real, not injected: a learning rate of 1e39 passes the config checks (it is a finite number > 0),
but Adam's first step is about lr per weight, which overflows float32 to inf.
"""

import json
from pathlib import Path

import pytest

from cai.config import DPOConfig, GroupRLConfig, PMConfig, PPOConfig, load_config
from cai.errors import CaiError, NonFiniteError
from cai.models import resolve_model
from cai.store import Metrics

HUGE = 1e39
PROMPTS = ["Say something.", "Hello!", "What is a cat?", "Tell me a story."]


def comparisons(n=8):
    return [{"key": f"c{i}", "prompt": PROMPTS[i % 4], "answer_a": "Yes." * (1 + i % 3), "answer_b": "No, sorry.",
             "soft_label": 0.9 if i % 2 else 0.1} for i in range(n)]


def assert_stopped(err: Exception, tmp_path: Path, published: Path) -> None:
    msg = str(err)
    assert isinstance(err, CaiError) and "\n" not in msg and "not finite" in msg, msg
    assert not published.exists()
    ckpts = [p for p in tmp_path.rglob("*") if p.name.startswith(("checkpoint-", "step-"))]
    assert ckpts == [], ckpts


def test_sft(tmp_path):
    from cai.train.sft import train_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                        "completion": [{"role": "assistant", "content": "Sure, here you go."}]}) + "\n"
                            for p in PROMPTS))
    cfg = load_config(["stage=sl", "generator.model=tiny", f"sft.learning_rate={HUGE}", "sft.batch_size=2",
                       "sft.save_steps=1", "sft.bf16=false", "sft.warmup_ratio=0"])
    with pytest.raises(NonFiniteError) as e:
        train_sft(data, resolve_model("tiny"), cfg, tmp_path / "model", tmp_path / "ckpt",
                  Metrics(tmp_path / "m.jsonl", "sl"), "card", "k", device="cpu", progress=False)
    assert_stopped(e.value, tmp_path, tmp_path / "model")


def test_pm(tmp_path):
    from cai.train.pm import train_pm

    cfg = PMConfig(learning_rate=HUGE, warmup_ratio=0.0, batch_size=4, eval_fraction=0.0, save_steps=1, bf16="false", clear_pairs="")
    with pytest.raises(NonFiniteError) as e:
        train_pm(comparisons(), resolve_model("tiny"), cfg, 0, tmp_path / "pm", tmp_path / "ckpt",
                 Metrics(tmp_path / "m.jsonl", "rl"), "k", device="cpu", progress=False)
    assert_stopped(e.value, tmp_path, tmp_path / "pm")


def test_dpo(tmp_path):
    from cai.train.dpo import train_dpo

    cfg = DPOConfig(learning_rate=HUGE, warmup_ratio=0.0, batch_size=4, save_steps=1, bf16="false", margin=0.0)
    with pytest.raises(NonFiniteError) as e:
        train_dpo(comparisons(), resolve_model("tiny"), cfg, 0, tmp_path / "policy", tmp_path / "ckpt",
                  Metrics(tmp_path / "m.jsonl", "rl"), "card", device="cpu", progress=False)
    assert_stopped(e.value, tmp_path, tmp_path / "policy")


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_group_rl(tmp_path, algorithm):
    from cai.train.group_rl import train_group_rl

    cfg = GroupRLConfig(learning_rate=HUGE, num_generations=2, batch_size=4, max_completion_length=4, save_steps=1,
                        bf16="false")
    with pytest.raises(NonFiniteError) as e:
        train_group_rl(algorithm, resolve_model("tiny"), lambda ps, ans: [float(len(a)) for a in ans], PROMPTS, cfg,
                       0, tmp_path, Metrics(tmp_path / "m.jsonl", "rl"), "k", "card", device="cpu", progress=False)
    assert_stopped(e.value, tmp_path, tmp_path / "policy")


def test_ppo(tmp_path):
    from cai.train.ppo import run_ppo

    cfg = PPOConfig(steps=2, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4,
                    learning_rate=HUGE, save_every=1, sample_every=0)
    with pytest.raises(NonFiniteError) as e:
        run_ppo(resolve_model("tiny"), lambda ps, ans: [float(len(a)) for a in ans], PROMPTS, cfg, tmp_path,
                Metrics(tmp_path / "m.jsonl", "rl"), progress=False)
    assert_stopped(e.value, tmp_path, tmp_path / "policy")
    assert "PPO step 1" in str(e.value)
