"""LoRA (PEFT) in every trainer on the tiny model: the adapters train, the base weights stay, the published
directory is the merged model (loadable as a plain HF model) plus the adapter in adapter/."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai.config import (
    DPOConfig,
    GroupRLConfig,
    LoRAConfig,
    PMConfig,
    PPOConfig,
    SFTConfig,
    SLConfig,
    key_dict,
    load_config,
)
from cai.errors import CaiError
from cai.io import write_atomic
from cai.models import load_tokenizer, resolve_model
from cai.store import Metrics
from cai.train.common import ADAPTER_DIR, TRAIN_INFO, with_lora
from cai.train.dpo import train_dpo
from cai.train.group_rl import train_group_rl
from cai.train.pm import init_pm, load_pm, pm_training_key, score_answers, train_pm
from cai.train.ppo import reference_logits, run_ppo, sample_answers, setup, uses_checkpointing
from cai.train.sft import sft_training_key, train_sft

LORA = LoRAConfig(enabled=True, r=4, alpha=8.0, dropout=0.0)


def changed_keys(before: dict, after: dict) -> list[str]:
    return [k for k in after if k in before and not torch.equal(after[k].float(), before[k].float())]


def check_published(out: Path, base_state: dict, min_changed: int = 1) -> dict:
    """out holds merged weights that differ from the base in the adapted layers only, and an adapter."""
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").exists()
    assert (out / ADAPTER_DIR / "adapter_config.json").exists()
    assert not (out / "adapter_config.json").exists()  # a plain HF directory: loaders see no PEFT layout
    merged = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in merged)
    changed = changed_keys(base_state, merged)
    assert len(changed) >= min_changed
    assert all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "score")) for k in changed), changed
    assert not any("embed_tokens" in k or "norm" in k for k in changed)
    return merged


@pytest.mark.parametrize("override,message", [
    ("sl.sft.lora.r=0", "sft.lora.r=0: expected a number > 0"),
    ("rl.pm.lora.alpha=-1", "pm.lora.alpha=-1.0: expected a number > 0"),
    ("rl.ppo.lora.dropout=1.0", "ppo.lora.dropout=1.0: expected a number >= 0 and < 1"),
    ("dpo.dpo.lora.target_modules=[]", "dpo.lora.target_modules=[]: expected a non-empty list"),
    ("rl.grpo.lora.target_modules=[q_proj,'a b']", "grpo.lora.target_modules[1]='a b': expected a module name"),
])
def test_lora_settings_are_checked_on_load(override, message):
    stage, setting = override.split(".", 1)
    with pytest.raises(CaiError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config([f"stage={stage}", setting])
    assert load_config(["stage=rl"]).ppo.lora.enabled is False  # off by default


def test_lora_settings_off_leave_training_keys_as_before():
    assert "lora" not in key_dict(SFTConfig()) and key_dict(SFTConfig(lora=LORA))["lora"]["r"] == 4


def test_sft_with_lora_trains_the_adapters_and_publishes_a_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = resolve_model("tiny")
    data = tmp_path / "sft.jsonl"
    write_atomic(data, "".join(json.dumps({"prompt": [{"role": "user", "content": f"question {i}"}],
                                           "completion": [{"role": "assistant", "content": "yes " * 8}]}) + "\n"
                               for i in range(8)))
    cfg = SLConfig(sft=SFTConfig(epochs=2, learning_rate=1e-2, batch_size=4, max_length=64, lora=LORA))
    key = sft_training_key(data, ref, cfg.sft, 0)
    assert key != sft_training_key(data, ref, SFTConfig(epochs=2, learning_rate=1e-2, batch_size=4, max_length=64), 0)
    out = tmp_path / "model"
    s = train_sft(data, ref, cfg, out, tmp_path / "ckpt", Metrics(tmp_path / "m.jsonl", "sl"), "card", key,
                  device="cpu", progress=False)
    assert s["lora"]["r"] == 4 and json.loads((out / TRAIN_INFO).read_text())["key"] == key
    base = load_file(Path(ref.path) / "model.safetensors")
    check_published(out, base, min_changed=4)
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain model: no peft needed to load it
    assert type(model).__name__ == "LlamaForCausalLM"
    # the adapter on the base gives the same logits as the merged weights
    from peft import PeftModel

    ids = torch.tensor([[1, 5, 9, 13, 21]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref.path), out / ADAPTER_DIR)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_pm_with_lora_learns_and_publishes_a_merged_pm(tmp_path):
    from tests.test_pm import yes_no_comparisons

    ref = resolve_model("tiny")
    tok = load_tokenizer(ref)
    cfg = PMConfig(epochs=3, learning_rate=1e-2, batch_size=8, eval_fraction=0.25, save_steps=1000, max_length=128,
                   lora=LORA, clear_pairs="")
    key = pm_training_key("0" * 64, ref, cfg, seed=0)
    assert key != pm_training_key("0" * 64, ref, PMConfig(epochs=3, learning_rate=1e-2, batch_size=8,
                                                          eval_fraction=0.25, save_steps=1000, max_length=128,
                                                          clear_pairs=""), seed=0)
    out = tmp_path / "pm"
    s = train_pm(yes_no_comparisons(24), ref, cfg, 0, out, tmp_path / "ckpt", Metrics(tmp_path / "m.jsonl", "rl"),
                 key, device="cpu", progress=False)
    assert s["lora"] is True and s["heldout"]["accuracy"] >= 0.8, s["heldout"]
    merged = check_published(out, init_pm(ref, tok, seed=0).state_dict(), min_changed=2)
    assert "score.weight" in merged
    model, tokenizer = load_pm(out, device="cpu", dtype="float32")
    yes, no = score_answers(model, tokenizer, ["is it blue?"] * 2, ["yes yes yes", "no no no"])
    assert yes > no


def test_a_target_module_the_model_lacks_is_named(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny").path)
    with pytest.raises(CaiError, match=r"sft.lora.target_modules=\['qkv'\]: .*q_proj"):
        with_lora(model, LoRAConfig(enabled=True, target_modules=["qkv"]), "CAUSAL_LM", "sft.lora")


# --- PPO ----------------------------------------------------------------------------------------------------

PROMPTS = ["Say something.", "Hello!", "What is a cat?", "Tell me a story."]


def newline_share(prompts, answers):
    return [min(a.count("\n") / 4, 1.0) for a in answers]


def ppo_cfg(**over):
    kw = dict(steps=2, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, temperature=0.1,
              learning_rate=1e-2, value_learning_rate=1e-2, init_kl_coef=0.05, sample_every=0, save_every=2,
              lora=LORA)
    kw.update(over)
    return PPOConfig(**kw)


def test_ppo_lora_reference_is_the_policy_with_adapters_off(tmp_path):
    """One copy of the weights: the reference logits are the base model's, whatever the adapters hold."""
    from transformers import AutoModelForCausalLM

    ref = resolve_model("tiny")
    st = setup(ref, ppo_cfg(), PROMPTS, None, None, None)
    assert st.reference is None
    model = st.accelerator.unwrap_model(st.model)
    assert model.value_model is None and model.value_head is not None  # value_model=auto -> shared under LoRA
    n_base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(ref.path).parameters())
    n_all = sum(p.numel() for p in model.parameters())
    assert n_all < 1.1 * n_base  # no second backbone
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)

    ids = torch.tensor([[1, 5, 9, 13, 21, 34]])
    mask = torch.ones_like(ids)
    base = AutoModelForCausalLM.from_pretrained(ref.path)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits[:, -4:-1]
        for name, p in model.policy.named_parameters():  # the adapters move away from zero
            if "lora_B" in name:
                p.normal_(0, 0.5)
        torch.testing.assert_close(reference_logits(st, ids, mask, 3), expected)
        assert not torch.allclose(model.policy(input_ids=ids).logits[:, -4:-1], expected, atol=1e-3)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_ppo_with_lora_trains_and_publishes_a_merged_policy(tmp_path, value_model):
    ref = resolve_model("tiny")
    out = tmp_path / "ppo"
    s = run_ppo(ref, newline_share, PROMPTS, ppo_cfg(value_model=value_model), out,
                Metrics(out / "metrics.jsonl", "rl"), progress=False)
    assert s["lora"] and s["shared_reference"] and s["value_model"] == value_model
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "rl/ppo/kl" in x]
    assert len(records) == 2 and records[-1]["rl/ppo/kl"] != 0.0  # the policy moved away from its reference
    check_published(out / "policy", load_file(Path(ref.path) / "model.safetensors"), min_changed=4)
    if value_model == "shared":  # a second online round: the adapter continues on the reference's weights
        nxt = run_ppo(resolve_model(str(out / "policy")), newline_share, PROMPTS, ppo_cfg(steps=1), tmp_path / "r2",
                      Metrics(tmp_path / "r2" / "metrics.jsonl", "rl"), progress=False, reference=ref)
        assert nxt["shared_reference"]
        check_published(tmp_path / "r2" / "policy", load_file(Path(ref.path) / "model.safetensors"), min_changed=4)


def test_ppo_shared_value_head_without_lora_trains_every_weight(tmp_path):
    cfg = ppo_cfg(lora=LoRAConfig(), value_model="shared", steps=2, learning_rate=1e-4, value_learning_rate=1e-4)
    st = setup(resolve_model("tiny"), cfg, PROMPTS, None, None, None)
    model = st.accelerator.unwrap_model(st.model)
    assert st.reference is not None and model.value_model is None
    assert all(p.requires_grad for p in model.parameters())
    out = tmp_path / "ppo"
    s = run_ppo(resolve_model("tiny"), newline_share, PROMPTS, cfg, out, Metrics(out / "metrics.jsonl", "rl"),
                progress=False)
    assert s["value_model"] == "shared" and not s["shared_reference"]
    assert not (out / "policy" / ADAPTER_DIR).exists()
    merged = load_file(out / "policy" / "model.safetensors")
    assert "model.embed_tokens.weight" in changed_keys(load_file(Path(resolve_model("tiny").path) /
                                                                 "model.safetensors"), merged)


# --- DPO, RLOO, GRPO (TRL's trainers, given a PeftModel) -----------------------------------------------------


def test_dpo_with_lora(tmp_path):
    ref = resolve_model("tiny")
    comparisons = [{"prompt": f"question {i}?", "answer_a": "yes yes", "answer_b": "no no", "soft_label": 0.9}
                   for i in range(8)]
    cfg = DPOConfig(batch_size=4, max_length=64, learning_rate=1e-2, lora=LORA)
    s = train_dpo(comparisons, ref, cfg, 0, tmp_path / "dpo", tmp_path / "ckpt", Metrics(tmp_path / "m.jsonl", "rl"),
                  "card", device="cpu", progress=False)
    assert s["lora"] and s["steps"] == 2
    check_published(tmp_path / "dpo", load_file(Path(ref.path) / "model.safetensors"), min_changed=4)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_group_rl_with_lora(tmp_path, algorithm):
    ref = resolve_model("tiny")
    cfg = GroupRLConfig(num_generations=2, max_completion_length=4, batch_size=4, learning_rate=1e-2, lora=LORA)
    def longer(prompts, answers):  # varies within a group (newline_share is 0 for every answer here)
        return [len(a) / 20 for a in answers]

    s = train_group_rl(algorithm, ref, longer, PROMPTS, cfg, 0, tmp_path, Metrics(tmp_path / "m.jsonl", "rl"),
                       "k", "card", device="cpu", progress=False)
    assert s["lora"] and s["steps"] >= 1 and s["first_reward"] is not None
    check_published(tmp_path / "policy", load_file(Path(ref.path) / "model.safetensors"), min_changed=4)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_ppo_gradient_checkpointing_keeps_gradients_and_the_sampling_cache(value_model):
    """auto turns it on under LoRA; the update's gradients and the sampled answers are those without it."""
    assert uses_checkpointing(ppo_cfg()) and not uses_checkpointing(ppo_cfg(lora=LoRAConfig()))
    assert not uses_checkpointing(ppo_cfg(gradient_checkpointing="false"))
    ref = resolve_model("tiny")
    ids = torch.tensor([[1, 5, 9, 13, 21, 34, 55, 2], [3, 7, 11, 17, 19, 23, 29, 31]])
    mask = torch.ones_like(ids)
    grads, answers = [], []
    for setting in ("true", "false"):
        st = setup(ref, ppo_cfg(value_model=value_model, gradient_checkpointing=setting), PROMPTS, None, None, None)
        model = st.accelerator.unwrap_model(st.model)
        layers = model.policy.get_base_model().model.layers
        assert all(layer.gradient_checkpointing == (setting == "true") for layer in layers)
        with torch.no_grad():
            for name, p in model.named_parameters():  # adapters away from zero, so every LoRA weight gets a gradient
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
        logits, values, _ = model(ids, mask, 3)
        (logits.float().logsumexp(-1).mean() + values.float().pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        answers.append(sample_answers(model.policy, ids[:, :5], mask[:, :5], st.eos_ids, st.pad_id,
                                      ppo_cfg(max_new_tokens=6, temperature=1.0), [1, 2])[0])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    torch.testing.assert_close(answers[0], answers[1])
