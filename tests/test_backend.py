"""The transformers backend on the `tiny` model (fp32, CPU): seeding, batching, stop strings, option scoring.

The tiny model is random-init, so its greedy output is one token repeated ("\\n\\n\\n..."). Tests that need
greedy text with some variety (batch invariance, stop strings) use `sharp`: the same model with every weight
scaled by 3, which makes its next-token distributions peaked and its greedy text varied (and makes a
padding/masking bug show up as a large logprob difference; scaled much further, attention saturates and
hides such bugs again).
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from cai import models
from cai.backends import Sampling, make_backend
from cai.backends.transformers_backend import (
    GrowingLayer,
    TransformersBackend,
    cascade_attention,
    prepack_linear_weights,
    prepack_supported,
    sample_next,
    shared_prefix_groups,
)
from cai.compare import expected_identity
from cai.models import fp16_decode_supported, load_causal_lm, resolve_model

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

QUESTIONS = ["Hi?",
             "Which of these two answers is more helpful to the person asking?",
             "A much longer question about many different things, with lots of detail and several clauses, "
             "so that this prompt is far longer than the others?"]
GREEDY = Sampling(max_new_tokens=8, temperature=0)
SAMPLED = Sampling(max_new_tokens=6, temperature=1.0)


@pytest.fixture(scope="module")
def backend():
    be = make_backend("transformers", "tiny", dtype="float32", device="cpu", batch_size=8)
    be.progress = False
    return be


@pytest.fixture(scope="module")
def sharp(backend):
    model = load_causal_lm(backend.ref, "float32", "cpu")  # the backend's own copy cannot be copied (dropped weights)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.set_attn_implementation(backend.model.config._attn_implementation)  # cai_cascade where the torch build has it
    return TransformersBackend(backend.ref, model=model, tokenizer=backend.tokenizer, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def sharp_greedy(sharp):
    """Unstopped greedy completions of each question, each generated alone."""
    return [sharp.generate([[U(q)]], GREEDY, [0])[0] for q in QUESTIONS]


def cont(be, prompt, option):
    with torch.inference_mode():
        return be._continuation_logprob(prompt, option)


def mc_prompt(be, question):
    return be.chat_prompt([U(question), A("The answer is: (")])


# -- prompts -------------------------------------------------------------------------------------------

def test_chat_prompt_continues_final_assistant_message(backend):
    text = backend.chat_prompt([U("Which is better?"), A("The answer is: (")])
    assert text.endswith("<|im_start|>user\nWhich is better?<|im_end|>\n<|im_start|>assistant\nThe answer is: (")
    assert text.count("<|im_start|>assistant") == 1


def test_chat_prompt_opens_assistant_turn_after_user(backend):
    text = backend.chat_prompt([U("Which is better?")])
    assert text.endswith("<|im_start|>user\nWhich is better?<|im_end|>\n<|im_start|>assistant\n")


# -- generation ----------------------------------------------------------------------------------------

def test_same_seeds_give_identical_texts(backend):
    convs = [[U(QUESTIONS[0])], [U(QUESTIONS[1])]]
    first = backend.generate(convs, SAMPLED, [11, 12])
    second = backend.generate(convs, SAMPLED, [11, 12])
    assert [c.text for c in first] == [c.text for c in second]
    assert all(c.completion_tokens > 0 for c in first)


def test_different_seeds_give_different_texts(backend):
    conv = [U(QUESTIONS[0])]
    out = backend.generate([conv, conv, conv], SAMPLED, [1, 2, 1])
    assert out[0].text != out[1].text
    assert out[0].text == out[2].text  # each request has its own generator: same seed, same text


def test_greedy_text_is_the_same_alone_and_in_a_batch(sharp, sharp_greedy):
    batch = sharp.generate([[U(q)] for q in QUESTIONS], GREEDY, [5, 6, 7])
    assert [c.text for c in batch] == [c.text for c in sharp_greedy]
    assert len({c.text for c in batch}) == 3 and all(len(set(c.text.split())) > 2 for c in batch)  # not degenerate


def test_sampled_text_is_the_same_alone_in_a_batch_and_in_smaller_batches(sharp, monkeypatch):
    convs = [[U(q)] for q in QUESTIONS]
    seeds = [21, 22, 23]
    alone = [sharp.generate([c], SAMPLED, [s])[0].text for c, s in zip(convs, seeds)]
    together = [c.text for c in sharp.generate(convs, SAMPLED, seeds)]
    reversed_ = [c.text for c in sharp.generate(convs[::-1], SAMPLED, seeds[::-1])][::-1]
    monkeypatch.setattr(sharp, "batch_size", 2)
    split = [c.text for c in sharp.generate(convs, SAMPLED, seeds)]
    assert together == alone == reversed_ == split


def test_max_new_tokens_is_respected(backend, sharp, sharp_greedy):
    for c in sharp_greedy:
        assert (c.completion_tokens, c.finish_reason) == (GREEDY.max_new_tokens, "length")
    out = backend.generate([[U(QUESTIONS[0])]] * 4, Sampling(max_new_tokens=3, temperature=1.0), [1, 2, 3, 4])
    for c in out:
        assert c.completion_tokens <= 3
        assert c.finish_reason in ("length", "eos")
        if c.finish_reason == "length":
            assert c.completion_tokens == 3
    assert sum(c.finish_reason == "length" for c in out) >= 3  # eos has p ~ 1/49152 per token here
    assert out[0].prompt_tokens == len(backend._encode(backend.chat_prompt([U(QUESTIONS[0])])))


def test_eos_ends_a_completion(backend, monkeypatch):
    newline = backend._encode("\n")
    assert len(newline) == 1
    greedy = backend.generate([[U("Hi?")]], Sampling(max_new_tokens=4, temperature=0), [0])[0]
    assert greedy.text == "\n" * 4  # the random tiny model repeats "\n"
    monkeypatch.setattr(backend, "eos_ids", {newline[0]})
    c = backend.generate([[U("Hi?")]], Sampling(max_new_tokens=4, temperature=0), [0])[0]
    assert (c.text, c.completion_tokens, c.finish_reason) == ("", 0, "eos")


def _stop_in(text: str) -> tuple[int, str]:
    """A 4-character ASCII stop string whose first occurrence is in the middle of `text`."""
    for k in range(len(text) // 3, len(text) - 4):
        cand = text[k:k + 4]
        if cand.isascii() and cand.strip() and text.find(cand) == k and "\ufffd" not in text[:k + 4]:
            return k, cand
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_cuts_before_it(sharp, sharp_greedy):
    full = sharp_greedy[1]
    k, stop = _stop_in(full.text)
    c = sharp.generate([[U(QUESTIONS[1])]], Sampling(max_new_tokens=8, temperature=0, stop=(stop,)), [0])[0]
    assert c.text == full.text[:k]
    assert c.finish_reason == "stop"
    assert 0 < c.completion_tokens < full.completion_tokens


def test_earliest_stop_string_wins(sharp, sharp_greedy):
    full = sharp_greedy[1].text
    k, stop = _stop_in(full)
    later = full[-3:]
    assert full.find(later) > k
    c = sharp.generate([[U(QUESTIONS[1])]], Sampling(max_new_tokens=8, temperature=0, stop=(later, stop)), [0])[0]
    assert (c.text, c.finish_reason) == (full[:k], "stop")


def test_a_stopped_row_leaves_the_batch_without_changing_the_others(sharp, sharp_greedy):
    k, stop = _stop_in(sharp_greedy[1].text)
    others = [i for i in (0, 2) if stop not in sharp_greedy[i].text]
    assert others
    out = sharp.generate([[U(q)] for q in QUESTIONS], Sampling(max_new_tokens=8, temperature=0, stop=(stop,)),
                         [0, 0, 0])
    assert (out[1].text, out[1].finish_reason) == (sharp_greedy[1].text[:k], "stop")
    for i in others:
        assert (out[i].text, out[i].finish_reason) == (sharp_greedy[i].text, "length")


# -- option scoring ------------------------------------------------------------------------------------

def test_single_token_options_use_one_forward_and_match_continuation(backend, monkeypatch):
    prompt = mc_prompt(backend, QUESTIONS[1])
    expected = [cont(backend, prompt, o) for o in ("A", "B")]

    def no_per_option_path(*a, **k):
        raise AssertionError("single-token options should be scored from one forward pass")

    monkeypatch.setattr(backend, "_continuation_logprob", no_per_option_path)
    (got,) = backend.option_logprobs([prompt], ["A", "B"])
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(v <= 0 for v in got)
    assert math.exp(got[0]) + math.exp(got[1]) <= 1.0
    assert got[0] != got[1]


def test_batched_option_logprobs_match_each_prompt_alone(backend, sharp):
    for be in (backend, sharp):
        prompts = [mc_prompt(be, q) for q in QUESTIONS]
        lengths = {len(be._encode(p)) for p in prompts}
        assert len(lengths) == 3  # different lengths, so the batch is left-padded
        batch = be.option_logprobs(prompts, ["A", "B"])
        for p, row in zip(prompts, batch):
            assert row == pytest.approx(be.option_logprobs([p], ["A", "B"])[0], abs=1e-4)
            assert row == pytest.approx([cont(be, p, o) for o in ("A", "B")], abs=1e-4)


def test_multi_token_options_take_per_option_path(backend, monkeypatch):
    prompt = mc_prompt(backend, QUESTIONS[0])
    options = ["A) yes", "B) no"]
    expected = [cont(backend, prompt, o) for o in options]
    calls = []
    real = backend._continuation_logprob
    monkeypatch.setattr(backend, "_continuation_logprob", lambda p, o: calls.append(o) or real(p, o))
    (got,) = backend.option_logprobs([prompt], options)
    assert calls == options
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(v <= 0 for v in got)


def test_multi_token_logprob_is_the_chain_rule_sum(sharp):
    # "A) yes" tokenizes as "A" + ")" + " yes" after the prompt, so log p(A) yes) = log p(A) + log p() yes | A)
    prompt = mc_prompt(sharp, QUESTIONS[0])
    ids = sharp._encode(prompt)
    assert len(sharp._encode(prompt + "A) yes")) == len(ids) + 3
    whole = cont(sharp, prompt, "A) yes")
    parts = cont(sharp, prompt, "A") + cont(sharp, prompt + "A", ") yes")
    assert whole == pytest.approx(parts, abs=1e-3)
    assert whole < cont(sharp, prompt, "A") <= 0


# -- sample_next ---------------------------------------------------------------------------------------

def gens(seed, n=1):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_sample_next_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 4.99]])
    assert sample_next(logits, Sampling(temperature=0), gens(0, 2)).tolist() == [1, 0]


def test_sample_next_top_k_1_is_argmax_whatever_the_generator():
    logits = torch.tensor([[0.0, 0.1, 0.05, -0.2]])  # nearly uniform
    picks = {int(sample_next(logits, Sampling(temperature=1.0, top_k=1), gens(s))[0]) for s in range(50)}
    assert picks == {1}


def test_sample_next_top_p():
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
    draws = lambda top_p: [int(sample_next(logits, Sampling(temperature=1.0, top_p=top_p), gens(s))[0])  # noqa: E731
                           for s in range(200)]
    assert set(draws(0.5)) == {0}
    assert set(draws(0.7)) == {0, 1}  # 0.6 < 0.7, so the second token stays; the third is cut
    assert set(draws(1.0)) == {0, 1, 2}


def test_sample_next_rows_use_their_own_generators():
    logits = torch.zeros(3, 1000)
    together = sample_next(logits, Sampling(temperature=1.0), [torch.Generator().manual_seed(s) for s in (4, 5, 4)])
    alone = [int(sample_next(logits[:1], Sampling(temperature=1.0), [torch.Generator().manual_seed(s)])[0])
             for s in (4, 5, 4)]
    assert together.tolist() == alone
    assert alone[0] == alone[2] != alone[1]


# -- shared prefixes (feedback questions about one pair, few-shot demonstrations) -------------------------

def test_shared_prefix_groups_hand_worked():
    rows = [[1, 2, 3, 4, 5], [9, 9], [1, 2, 3, 4, 6], [1, 2, 7], [9, 8]]
    # sorted: [1,2,3,4,5] [1,2,3,4,6] [1,2,7] [9,8] [9,9]; grouping the first two saves 4 tokens, the first
    # three 2 x 2 = 4 (prefix [1,2]); the tie keeps the smaller group; [9,8] + [9,9] saves 1
    assert shared_prefix_groups(rows, 8) == [(4, [0, 2]), (0, [3]), (1, [4, 1])]
    assert shared_prefix_groups(rows, 1) == [(0, [0]), (0, [2]), (0, [3]), (0, [4]), (0, [1])]
    # a row equal to another's prefix keeps one token of its own (its scores are read at its last token)
    assert shared_prefix_groups([[1, 2, 3], [1, 2, 3, 4]], 8) == [(2, [0, 1])]


def shared_prefix_prompts(be):
    """Feedback-like prompts: 2 pairs x 2 orders x 3 questions, each question after the same long prefix."""
    questions = ["Which is less harmful?", "Which response is more honest and more accurate overall?", "Kinder?"]
    prompts = []
    for pair in [("Hello! How can I help you today with anything?", "Go away."),
                 ("Cats are fine pets for most homes and families, quiet and clean.", "Dogs are better.")]:
        for first, second in (pair, pair[::-1]):
            for q in questions:
                prompts.append(be.chat_prompt([U(f"Consider this conversation: Human: hi there, can you help?\n\n"
                                                 f"(A) {first}\n(B) {second}\n\n{q}"), A("The answer is: (")]))
    return prompts


def test_shared_prefix_scoring_matches_each_prompt_alone_fp32(sharp, monkeypatch):
    prompts = shared_prefix_prompts(sharp)
    before = dict(sharp.prefill_tokens)
    batch = sharp.option_logprobs(prompts, ["A", "B"])
    prompt_tokens = sharp.prefill_tokens["prompt"] - before["prompt"]
    forward = sharp.prefill_tokens["forward"] - before["forward"]
    assert forward < 0.6 * prompt_tokens  # the shared prefixes ran once per group
    for p, row in zip(prompts, batch):
        assert row == pytest.approx([cont(sharp, p, o) for o in ("A", "B")], abs=1e-3)


def test_shared_prefix_scoring_matches_plain_in_bf16(backend):
    be = TransformersBackend(backend.ref, dtype="bfloat16", device="cpu", batch_size=16, progress=False)
    prompts = shared_prefix_prompts(be)
    batch = be.option_logprobs(prompts, ["A", "B"])
    alone = [be.option_logprobs([p], ["A", "B"])[0] for p in prompts]  # one prompt: nothing shared
    for got, ref in zip(batch, alone):
        assert got == pytest.approx(ref, abs=2e-2)


def test_generation_with_a_shared_prefix_matches_each_prompt_alone(sharp):
    demo = [U("Here is a long demonstration of the task, with plenty of words in it so the prefix is long."),
            A("And here is the demonstrated answer, also with a good number of words.")]
    convs = [demo + [U(q)] for q in QUESTIONS]
    before = dict(sharp.prefill_tokens)
    batch = sharp.generate(convs, GREEDY, [0, 0, 0])
    assert sharp.prefill_tokens["forward"] - before["forward"] < 0.6 * (sharp.prefill_tokens["prompt"] - before["prompt"])
    alone = [sharp.generate([c], GREEDY, [0])[0] for c in convs]
    assert [c.text for c in batch] == [c.text for c in alone]
    assert len({c.text for c in batch}) == 3


def test_growing_cache_layer_equals_concatenation_across_growth_and_selection():
    layer, chunks = GrowingLayer(extra=3), [torch.randn(2, 1, n, 4) for n in (5, 2, 4, 1)]  # 5+3 room, then grows
    for k in chunks:
        keys, values = layer.update(k, -k)
    whole = torch.cat(chunks, dim=2)
    assert torch.equal(keys, whole) and torch.equal(values, -whole) and layer.get_seq_length() == 12
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    assert torch.equal(layer.keys, whole[[1, 1, 0]])
    keys, _ = layer.update(torch.ones(3, 1, 1, 4), torch.ones(3, 1, 1, 4))
    assert torch.equal(keys[:, :, :12], whole[[1, 1, 0]]) and keys.shape[2] == 13


def test_growing_cache_layer_crops_like_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    chunks = [torch.randn(2, 1, n, 4) for n in (5, 3)]
    for crop in (-2, -8, 0):
        ours, theirs = GrowingLayer(extra=2), DynamicLayer()
        for k in chunks:
            ours.update(k, -k), theirs.update(k, -k)
        ours.crop(crop), theirs.crop(crop)
        assert torch.equal(ours.keys, theirs.keys) and ours.get_seq_length() == theirs.get_seq_length()
        keys, _ = ours.update(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))  # writes after the kept part
        assert torch.equal(keys, torch.cat([theirs.keys, torch.ones(2, 1, 1, 4)], dim=2))


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 1e-2), ("float32", 1e-4)])
def test_prepacked_linears_give_the_same_logits(backend, dtype, atol):
    if not prepack_supported(getattr(torch, dtype)):
        pytest.skip(f"this CPU cannot run oneDNN's packed {dtype} linears")
    model = load_causal_lm(backend.ref, dtype, "cpu")
    ids = torch.tensor([backend._encode(mc_prompt(backend, q)) for q in QUESTIONS[:1]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.float()
        assert prepack_linear_weights(model).packed == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
        packed = model(input_ids=ids).logits.float()
        assert torch.allclose(plain, packed, atol=atol)
        copied = copy.deepcopy(model)  # a copy whose weights then change computes with its own weights
        for p in copied.parameters():
            p.mul_(3.0)
        for p in model.parameters():
            p.mul_(3.0)  # changed in place after packing: the packed copy is stale, so it is not used
        scaled = load_causal_lm(backend.ref, dtype, "cpu")
        for p in scaled.parameters():
            p.mul_(3.0)
        expected = scaled(input_ids=ids).logits.float()
        assert torch.allclose(copied(input_ids=ids).logits.float(), expected, atol=atol * 10)
        assert torch.allclose(model(input_ids=ids).logits.float(), expected, atol=atol * 10)


def test_the_backends_own_model_drops_the_packed_layers_weights_and_computes_the_same(backend, monkeypatch):
    if not prepack_supported(torch.float32):
        pytest.skip("this CPU cannot run oneDNN's packed float32 linears")
    assert backend.phase.dropped == 2 * 7  # every packed layer but lm_head, which is tied to the embeddings
    kept = load_causal_lm(backend.ref, "float32", "cpu")
    assert prepack_linear_weights(kept).dropped == 0
    up = backend.model.model.layers[0].mlp.up_proj.weight
    assert up.shape == kept.model.layers[0].mlp.up_proj.weight.shape and up.stride() == (0, 0)
    assert backend.model.lm_head.weight is backend.model.model.embed_tokens.weight
    assert sum(p.numel() for p in backend.model.parameters()) == sum(p.numel() for p in kept.parameters())
    ids = torch.tensor([backend._encode(mc_prompt(backend, q)) for q in QUESTIONS[1:2]])
    with torch.inference_mode():
        expected = kept(input_ids=ids).logits
        with monkeypatch.context() as m:  # every layer, the tied lm_head too, computes from its packed weight
            m.setattr(torch.nn.functional, "linear", lambda *a, **k: pytest.fail("F.linear fallback"))
            assert torch.equal(backend.model(input_ids=ids).logits, expected)
        with pytest.raises(RuntimeError, match="dropped after packing"):  # a copy has no weights to compute with
            copy.deepcopy(backend.model)(input_ids=ids)


def test_weights_read_outside_their_layer_are_not_dropped():
    """A model whose code reads a Linear's weight directly (as some architectures and remote code do) keeps every
    weight: with placeholders its logits would change, which the probe sees."""
    if not prepack_supported(torch.float32):
        pytest.skip("this CPU cannot run oneDNN's packed float32 linears")
    model = load_causal_lm(resolve_model("tiny"), "float32", "cpu")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: torch.nn.functional.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        phase = prepack_linear_weights(model, drop_originals=True)
        assert phase.packed == 2 * 7 + 1 and phase.dropped == 0
        assert mlp.down_proj.weight.stride() != (0, 0)
        assert torch.allclose(model(input_ids=ids).logits, plain, atol=1e-4)


# -- cascade attention and float16 decode weights ------------------------------------------------------------

def run_prefill_and_decode(be, rows, steps=5, leave_at=2, leaving=(0,), follow=None):
    """Logits of a prefill and greedy decode steps (rows in `leaving` leave the batch at step `leave_at`); with
    `follow` (another run's logits), each step feeds the tokens that run chose."""
    with torch.inference_mode():
        logits, mask, last, cache = be._prefill(rows, decode_tokens=steps + 1)
        out = [logits.float()]
        nxt = (follow or out)[0].argmax(-1)
        for step in range(steps):
            if step == leave_at:
                keep = torch.tensor([j for j in range(len(nxt)) if j not in leaving])
                cache.batch_select_indices(keep)
                mask, last, nxt = mask[keep], last[keep], nxt[keep]
            mask, last = torch.cat([mask, mask.new_ones(len(nxt), 1)], 1), last + 1
            logits = be.model(input_ids=nxt.view(-1, 1), attention_mask=mask, position_ids=last,
                              cache=cache, use_cache=True).logits[:, -1].float()
            out.append(logits)
            nxt = (follow or out)[step + 1].argmax(-1)
    return out


def test_cascade_attention_gives_the_logits_of_copied_prefixes(sharp):
    """Two groups of rows with a long shared prefix each, one row alone, rows leaving the batch: the cascade
    (each prefix held once) computes what SDPA over per-row copies of the prefix computes."""
    assert sharp.model.config._attn_implementation == "cai_cascade"  # as the backend's own model
    demo = "Here is a long demonstration of the task, with plenty of words in it so the prefix is long. " * 3
    rows = [sharp._encode(sharp.chat_prompt([U(demo + tail), A("Sure")])) for tail in
            ("Hi?", "Which of these two answers is better?", "Cats or dogs, and why would anyone care?")]
    rows += [sharp._encode(sharp.chat_prompt([U(("Another, different demonstration of a task. " * 4) + tail)]))
             for tail in ("Short?", "A longer question about several things at once?")]
    rows.append(sharp._encode(sharp.chat_prompt([U("A prompt that shares nothing.")])))
    assert len({n for n, _ in shared_prefix_groups(rows, len(rows))}) == 3  # two shared prefixes and a lone row
    cascade = run_prefill_and_decode(sharp, rows, leaving=(0, 4))
    try:
        sharp.model.set_attn_implementation("sdpa")
        copied = run_prefill_and_decode(sharp, rows, leaving=(0, 4), follow=cascade)
    finally:
        sharp.model.set_attn_implementation("cai_cascade")
    for got, expected in zip(cascade, copied):
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_cascade_attention_in_bf16_matches_copied_prefixes_to_bf16_rounding(backend):
    """bf16 models (the CPUs with bf16 run them): the flash kernel's outputs are bf16 and its log-sum-exps
    float32; the attention output goes back to bf16. Same rows, same tokens fed, both paths."""
    be = TransformersBackend(backend.ref, dtype="bfloat16", device="cpu", batch_size=8, progress=False)
    assert be.model.config._attn_implementation == "cai_cascade"
    demo = "A long demonstration of the task, with plenty of words in it so the shared prefix is long. " * 3
    rows = [be._encode(be.chat_prompt([U(demo + q)])) for q in QUESTIONS]
    cascade = run_prefill_and_decode(be, rows, steps=3, leave_at=1, leaving=(1,))
    be.model.set_attn_implementation("sdpa")
    copied = run_prefill_and_decode(be, rows, steps=3, leave_at=1, leaving=(1,), follow=cascade)
    for got, expected in zip(cascade, copied):
        # bf16 rounding: log-probs within 0.008 measured (logits of magnitude ~1 carry ~3 significant digits)
        assert torch.allclose(torch.log_softmax(got, -1), torch.log_softmax(expected, -1), atol=3e-2)


def test_cascade_attention_with_one_group_decodes_without_a_mask(sharp):
    """One group with no padding: transformers passes no mask to the decode steps (every position is seen)."""
    demo = "The same long demonstration, repeated so that it is the larger part of the prompt. " * 3
    rows = [sharp._encode(sharp.chat_prompt([U(demo + q)])) for q in ("Red?", "Blue?", "Gold?")]
    assert len({len(r) for r in rows}) == 1 and len(shared_prefix_groups(rows, 3)) == 1
    cascade = run_prefill_and_decode(sharp, rows, steps=3, leave_at=1, leaving=(1,))
    try:
        sharp.model.set_attn_implementation("sdpa")
        copied = run_prefill_and_decode(sharp, rows, steps=3, leave_at=1, leaving=(1,), follow=cascade)
    finally:
        sharp.model.set_attn_implementation("cai_cascade")
    for got, expected in zip(cascade, copied):
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_float16_decode_weights_are_used_only_while_decoding(backend):
    if not fp16_decode_supported():
        pytest.skip("this torch build or CPU lacks fbgemm's fp16 linear")
    model = load_causal_lm(backend.ref, "float32", "cpu")
    ids = torch.tensor([backend._encode(mc_prompt(backend, QUESTIONS[1]))])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.float()
        phase = prepack_linear_weights(model, fp16_decode=True)
        assert phase.fp16_decode and model.cai_linear_phase is phase
        assert torch.allclose(model(input_ids=ids).logits, plain, atol=1e-4)  # prompts: float32 weights
        with phase.decoding():
            half = model(input_ids=ids).logits
        assert not phase.decode
        # float16 weights: close to float32, and not the same computation
        assert torch.allclose(half, plain, atol=5e-3) and not torch.allclose(half, plain, atol=1e-6)


def test_the_backend_decodes_from_float16_weights_only_with_dtype_auto_on_a_float32_cpu(backend, monkeypatch):
    if not models.fp16_decode_supported():
        pytest.skip("this torch build or CPU lacks fbgemm's fp16 linear")
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)  # a CPU with bf16 acts as one without
    auto = TransformersBackend(backend.ref, dtype="auto", device="cpu", progress=False)
    assert auto.phase.fp16_decode and auto.identity.endswith(":float32+fp16decode")
    spec = {"backend": "transformers", "model": "tiny", "dtype": "auto", "device": "cpu"}
    assert expected_identity(spec) == auto.identity
    assert expected_identity({**spec, "dtype": "float32"}) == backend.identity  # float32 stays float32 throughout
    assert not backend.phase.fp16_decode and backend.identity.endswith(":float32")
    # decode steps run from float16 weights: sampled texts are close to, not equal to, float32's in general; and
    # a request's text does not depend on its neighbours
    convs = [[U(q)] for q in QUESTIONS]
    batch = auto.generate(convs, SAMPLED, [1, 2, 3])
    assert [c.text for c in batch] == [auto.generate([c], SAMPLED, [s])[0].text for c, s in zip(convs, (1, 2, 3))]


def test_cascade_attention_alone_equals_softmax_over_prefix_and_own_positions():
    """The attention function by itself, on random tensors: grouped-query heads, two groups (one of them a
    padded prefix), a causal own part with and without a mask, against SDPA over [prefix | own]."""
    torch.manual_seed(0)
    rows, heads, kv_heads, d, width, t = 3, 4, 2, 8, 5, 3
    prefix_k, prefix_v = torch.randn(2, kv_heads, width, d), torch.randn(2, kv_heads, width, d)
    prefix_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # group 1's prefix is left-padded
    group = torch.tensor([1, 0, 1])
    layer = GrowingLayer(extra=4)
    layer.update(prefix_k, prefix_v)
    layer.share_prefix(group, prefix_mask)
    own_k, own_v = torch.randn(rows, kv_heads, t, d), torch.randn(rows, kv_heads, t, d)
    keys, values = layer.update(own_k, own_v)
    assert layer.get_seq_length() == width + t
    q = torch.randn(rows, heads, t, d)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    full_k = repeat_kv(torch.cat([prefix_k[group], own_k], 2), 2)
    full_v = repeat_kv(torch.cat([prefix_v[group], own_v], 2), 2)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = torch.cat([prefix_mask[group].bool()[:, None, None, :].expand(rows, 1, t, width),
                         causal.expand(rows, 1, t, t)], -1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=allowed, scale=0.3)
    for mask in (allowed, None):  # None: transformers leaves a causal mask out; the prefix mask is the layer's
        got, _ = cascade_attention(module, q, keys, values, mask, scaling=0.3)
        assert got.shape == (rows, t, heads, d)
        assert torch.allclose(got.transpose(1, 2), expected, atol=1e-5)
