"""C-RLFT (sft.method=crlft): the per-source loss weights on a hand-made batch, the condition in training and in
the published chat template, and a tiny run end to end (stage=sl, then the model answers under the condition)."""

import json
import shutil

import pytest

from cai.config import CRLFTConfig, load_config
from cai.errors import CaiError
from cai.pipeline import main

from .conftest import ASSETS


def test_weights_of_a_hand_made_batch():
    from cai.train.sft import best_source, crlft_weights

    rewards = {"human": 1.0, "revision": 0.5, "initial": 0.1}
    sources = ["human", "revision", "revision", "initial"]
    # rewards 1.0, 0.5, 0.5, 0.1: mean 2.1 / 4 = 0.525, so weights are reward / 0.525
    assert crlft_weights(sources, rewards) == pytest.approx([1 / 0.525, 0.5 / 0.525, 0.5 / 0.525, 0.1 / 0.525])
    assert crlft_weights(sources, rewards, normalize=False) == [1.0, 0.5, 0.5, 0.1]
    assert best_source({"revision", "initial"}, rewards) == "revision"  # human is not in the data
    assert best_source({"revision", "initial"}, rewards, "initial") == "initial"
    with pytest.raises(CaiError, match="tie"):
        best_source({"revision", "helpful"}, {"revision": 0.5, "helpful": 0.5})


def test_weighted_loss_on_a_hand_made_batch(tmp_path):
    """The trainer's loss on a batch of three equals sum_i w_i * NLL_i / completion tokens, NLL_i from a plain
    forward pass; with all weights 1 it is plain SFTTrainer's loss."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cai.models import load_tokenizer, resolve_model
    from cai.train.sft import weighted_sft_trainer_class

    base = resolve_model("tiny")
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    rows = {"prompt": [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to three."}],
                       [{"role": "system", "content": "Answer class: initial"}, {"role": "user", "content": "Why?"}]],
            "completion": [[{"role": "assistant", "content": "Hi there!"}],
                           [{"role": "assistant", "content": "One, two, three."}],
                           [{"role": "assistant", "content": "Because."}]],
            "weight": [1.6, 1.2, 0.2]}  # by hand: rewards 0.8, 0.6, 0.1 over their mean 0.5
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, completion_only_loss=True,
                     report_to=[], use_cpu=True, max_length=64)
    cls, collate_with = weighted_sft_trainer_class()
    trainer = cls(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows), processing_class=tok)
    trainer.data_collator = collate_with(trainer.data_collator)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["weight"].tolist() == pytest.approx([1.6, 1.2, 0.2])

    # by hand: each row's summed NLL over its completion tokens, from the plain model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    mask = labels != -100
    nll = -(logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    assert (mask.sum(1) > 0).all()
    want = float((torch.tensor([1.6, 1.2, 0.2]) * nll).sum() / mask.sum())
    model.eval()
    with torch.no_grad():
        got = float(trainer.compute_loss(model, dict(batch)))
    assert got == pytest.approx(want, rel=1e-4)

    ones = dict(batch, weight=torch.ones(3))
    plain = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows).remove_columns("weight"),
                       processing_class=tok)
    with torch.no_grad():
        got_plain = float(plain.compute_loss(model, {k: v for k, v in batch.items() if k != "weight"}))
        got_ones = float(trainer.compute_loss(model, ones))
    assert got_ones == pytest.approx(got_plain, rel=1e-5) and got_ones == pytest.approx(float(nll.sum() / mask.sum()),
                                                                                         rel=1e-4)
    assert got != pytest.approx(got_plain, rel=1e-3)  # the weights change the loss


def test_conditioned_chat_template_renders_what_training_saw():
    from cai.models import load_tokenizer, resolve_model
    from cai.train.sft import condition_messages, conditioned_chat_template

    tok = load_tokenizer(resolve_model("tiny"))
    plain = tok.chat_template
    cond = 'Answer class: "revision" \\ é'
    conversations = [[{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]]
    for conv in conversations:
        tok.chat_template = plain
        want = tok.apply_chat_template(condition_messages(conv, cond), tokenize=False, add_generation_prompt=True)
        tok.chat_template = conditioned_chat_template(plain, cond)
        got = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert got == want and cond in got
    assert "SmolLM" not in got  # the condition's system turn replaces the template's default one


@pytest.mark.parametrize("override, message", [
    ("sft.crlft.rewards.experts=1", "sft.crlft.rewards.experts: no such SFT source"),
    ("sft.crlft.rewards.initial=-0.5", "sft.crlft.rewards.initial=-0.5: expected a finite number >= 0"),
    ("sft.crlft.rewards.human=nan", "sft.crlft.rewards.human=nan: expected a finite number >= 0"),
    ("sft.crlft.generate_with=expert", "sft.crlft.generate_with=expert: expected one of"),
    ("sft.method=rlft", "sft.method=rlft: expected one of sft, crlft"),
])
def test_bad_crlft_settings(override, message):
    with pytest.raises(CaiError, match=message.replace("(", r"\(")):
        load_config(["stage=sl", "sft.method=crlft", override])


def test_crlft_generate_with_needs_a_reward():
    with pytest.raises(CaiError, match="generate_with=initial: that source has no reward > 0"):
        CRLFTConfig(rewards={"revision": 1.0, "initial": 0.0}, generate_with="initial")
    with pytest.raises(CaiError, match="every reward is 0"):
        CRLFTConfig(rewards={"revision": 0.0})


def test_training_key_follows_the_condition_text_and_plain_sft_ignores_crlft(tmp_path):
    from cai.models import resolve_model
    from cai.train.sft import sft_training_key

    data, cond = tmp_path / "sft.jsonl", tmp_path / "cond.txt"
    data.write_text("{}\n")
    cond.write_text("<{{source}}>\n")
    base = resolve_model("tiny")

    def key(*over):
        return sft_training_key(data, base, load_config(["stage=sl", f"sft.crlft.condition_template={cond}",
                                                         *over]).sft, 0)

    crlft = key("sft.method=crlft")
    assert crlft != key() and key("sft.method=crlft", "sft.crlft.rewards.initial=0.3") != crlft
    plain = key()
    assert key("sft.crlft.rewards.initial=0.3") == plain  # plain SFT does not read the crlft settings
    cond.write_text("[{{source}}]\n")
    assert key("sft.method=crlft") != crlft and key() == plain


def test_crlft_sl_run_end_to_end(tmp_path):
    """stage=sl sft.method=crlft on the tiny model: initial answers join the data as their own source, every
    source is weighted, the model answers under the best source's condition (the chat template every backend,
    stage=rl, cai.evaluate, cai.compare and cai.serve render prompts with), and a rerun reuses the model."""
    from cai.backends import backend_for
    from cai.config import ModelConfig

    const = tmp_path / "constitution.yaml"
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", const)
    cond = tmp_path / "cond.txt"
    cond.write_text("<source={{source}}>\n")
    args = ["stage=sl", f"runs_dir={tmp_path / 'runs'}", f"constitution={const}", "generator.model=tiny",
            "red_team.limit=3", "critique.rounds=1", "critique.few_shot=0", "sampling.max_new_tokens=4",
            "sft.helpful_ratio=0.34", "sft.batch_size=8", "sft.max_length=96", "progress=false", "run=c",
            "sft.method=crlft", f"sft.crlft.condition_template={cond}", "sft.crlft.rewards.revision=1.0",
            "sft.crlft.rewards.initial=0.25", "sft.crlft.rewards.helpful=0.5"]
    main(args)
    sl = tmp_path / "runs" / "c" / "sl"
    rows = [json.loads(x) for x in (sl / "sft.jsonl").read_text().splitlines()]
    counts = {src: sum(r["source"] == src for r in rows) for src in ("revision", "initial", "helpful")}
    assert counts["revision"] == counts["initial"] == 3 and counts["helpful"] >= 1
    info = json.loads((sl / "summary.json").read_text())["train"]["crlft"]
    mean = (3 * 1.0 + 3 * 0.25 + counts["helpful"] * 0.5) / (6 + counts["helpful"])
    assert info["generate_with"] == "revision" and info["condition"] == "<source=revision>"
    assert info["sources"]["initial"] == {"examples": 3, "weight": pytest.approx(0.25 / mean, abs=1e-6)}
    assert info["sources"]["revision"]["weight"] == pytest.approx(1.0 / mean, abs=1e-6)

    backend = backend_for(ModelConfig(model=str(sl / "model")), progress=False)
    rendered = backend.chat_prompt([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\n<source=revision><|im_end|>") and "SmolLM" not in rendered
    assert "C-RLFT" in (sl / "model" / "README.md").read_text()

    main(args)
    assert json.loads((sl / "summary.json").read_text())["train"]["reused"]
