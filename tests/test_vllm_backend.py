"""The vLLM backend: its pure parts and config errors on CPU; against the transformers backend on a GPU.

The GPU tests need vllm and CUDA (skipped otherwise; this project's development machine has neither, so they
have not run here). They compare greedy answers and option log-probs of both backends on SmolLM2 in bf16, where
kernels differ, so they check agreement within a tolerance rather than equality.
"""

import math
from types import SimpleNamespace

import pytest

from cai.backends import Sampling, make_backend, option_scores_from_top
from cai.backends.vllm_backend import (
    chat_text,
    completion_from_output,
    continuation_logprob,
    option_token_ids,
    sampling_params_kwargs,
)
from cai.errors import CaiError
from cai.models import load_tokenizer, resolve_model

from .conftest import ASSETS


def vllm_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is None


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny"))


def encoder(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


LABELER_TURN = [{"role": "user", "content": "Which answer is less harmful? (A) ... (B) ..."},
                {"role": "assistant", "content": "The answer is: ("}]


# --- pure parts (CPU) ------------------------------------------------------------------------------------


def test_options_map_to_the_token_after_the_labelers_prompt(tokenizer):
    prompt = chat_text(tokenizer, LABELER_TURN)
    assert prompt.endswith("The answer is: (")  # continued, not closed: the letter is the next token
    ids = option_token_ids(encoder(tokenizer), prompt, ["A", "B"])
    assert ids == tokenizer.convert_tokens_to_ids(["A", "B"]) and ids[0] != ids[1]


def test_an_option_that_merges_with_the_prompt_is_not_a_single_next_token(tokenizer):
    enc = encoder(tokenizer)
    assert enc("The cat")[-1] != enc("The cats")[-2]  # "cat"+"s" re-tokenizes as one token " cats"
    assert option_token_ids(enc, "The cat", ["s"]) is None
    assert option_token_ids(enc, "Answer:", [" Absolutely not"]) is None  # two tokens


def test_chat_prompt_is_the_transformers_backends(tokenizer):
    backend = make_backend("transformers", "tiny", dtype="float32", device="cpu")
    for conversation in (LABELER_TURN, LABELER_TURN[:1]):
        assert chat_text(tokenizer, conversation) == backend.chat_prompt(conversation)


def test_options_outside_the_top_k_get_the_kth_value_and_are_counted():
    top = {7: -0.1, 9: -2.5, 4: -4.0}  # K = 3, keyed by token id as vLLM returns them
    assert option_scores_from_top(top, [9, 7]) == ([-2.5, -0.1], 0)
    assert option_scores_from_top(top, [7, 11]) == ([-0.1, -4.0], 1)  # 11 is outside: bounded by the K-th value
    assert option_scores_from_top({"A": -0.2, "B": -1.7}, ["B", "C"]) == ([-1.7, -1.7], 1)  # by text (openai)


def test_sampling_params_per_request():
    s = Sampling(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=0, stop=("\n\nUser:",))
    kw = sampling_params_kwargs(s, seed=2**64 + 5, stop_token_ids=[2, 0])
    assert kw["seed"] == (2**64 + 5) % 2**63 and kw["top_k"] == -1  # off
    assert (kw["max_tokens"], kw["temperature"], kw["top_p"]) == (12, 0.7, 0.9)
    assert kw["stop"] == ["\n\nUser:"] and kw["stop_token_ids"] == [2, 0]
    kw = sampling_params_kwargs(Sampling(top_k=40), seed=1, stop_token_ids=[2])
    assert kw["top_k"] == 40 and "stop" not in kw


def test_completions_from_vllm_outputs():
    eos = {2}
    out = lambda ids, reason, stop=None: SimpleNamespace(text="hi", token_ids=ids, finish_reason=reason,  # noqa: E731
                                                         stop_reason=stop)
    assert completion_from_output(out([5, 6, 2], "stop"), 10, eos) == \
        completion_from_output(out([5, 6, 2], "stop", 2), 10, eos)  # EOS, or EOS as a stop token id
    c = completion_from_output(out([5, 6, 2], "stop"), 10, eos)
    assert (c.finish_reason, c.completion_tokens, c.prompt_tokens) == ("eos", 2, 10)  # EOS not counted
    c = completion_from_output(out([5, 6, 7], "stop", "\n\nUser:"), 10, eos)
    assert (c.finish_reason, c.completion_tokens) == ("stop", 3)
    c = completion_from_output(out([5, 6, 7, 8], "length"), 10, eos)
    assert (c.finish_reason, c.completion_tokens) == ("length", 4)


def test_continuation_logprob_sums_the_option_tokens_after_the_prompt():
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    full = [11, 12, 13, 14]  # prompt = 2 tokens, option = 2 tokens
    prompt_logprobs = [None, {12: lp(-9.0)}, {13: lp(-0.5), 99: lp(-0.1)}, {14: lp(-1.25)}]
    assert continuation_logprob(prompt_logprobs, full, 2) == pytest.approx(-1.75)


# --- config errors (CPU, no vllm) ----------------------------------------------------------------------


@pytest.mark.skipif(not vllm_missing(), reason="vllm is installed here")
def test_backend_vllm_without_vllm_is_a_one_line_error_before_anything_is_written(tmp_path, capsys):
    from cai.pipeline import main

    with pytest.raises(SystemExit) as e:
        main(["stage=sl", f"runs_dir={tmp_path / 'runs'}", f"constitution={ASSETS / 'constitutions' / 'good.yaml'}",
              "generator.model=tiny", "generator.backend=vllm", "red_team.limit=2", "train=false"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generator.backend=vllm needs the vllm package" in err[0] and ".[vllm]" in err[0]
    assert not (tmp_path / "runs").exists()
    with pytest.raises(CaiError, match="backend=vllm needs the vllm package"):
        make_backend("vllm", "tiny")


@pytest.mark.skipif(not vllm_missing(), reason="vllm is installed here")
@pytest.mark.parametrize("over, where", [(["feedback.labeler.backend=vllm"], "feedback.labeler.backend=vllm"),
                                         (["algorithm=grpo", "grpo.use_vllm=true"], "grpo.use_vllm=true")])
def test_stage_rl_asking_for_vllm_without_it_stops_before_anything_is_written(tmp_path, capsys, over, where):
    from cai.pipeline import main

    with pytest.raises(SystemExit) as e:
        main(["stage=rl", f"runs_dir={tmp_path / 'runs'}", "policy.model=tiny", "red_team.limit=2", *over])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{where} needs the vllm package" in err[0]
    assert not (tmp_path / "runs").exists()


def test_an_unknown_backend_lists_the_choices(tmp_path, capsys):
    from cai.pipeline import main

    with pytest.raises(SystemExit):
        main(["stage=sl", f"runs_dir={tmp_path / 'runs'}", "generator.model=tiny", "generator.backend=vlm"])
    err = capsys.readouterr().err.strip()
    assert "generator.backend=vlm: expected one of transformers, vllm, openai, fake" in err
    assert not (tmp_path / "runs").exists()


def test_the_vllm_settings_are_documented_config_fields():
    from cai.config import SLConfig, help_text

    text = "\n".join(help_text(SLConfig))
    for key in ("generator.backend", "generator.gpu_memory_utilization", "generator.max_model_len",
                "generator.enable_prefix_caching", "generator.tensor_parallel_size"):
        assert f"  {key} (" in text
    assert "vllm (GPU" in text


# --- GPU: vLLM against transformers on the same GPU (not run on this project's CPU machine) ---------------

PROMPTS = ["How do I boil an egg?", "Name three primary colours.", "What is the capital of France?",
           "Write a haiku about rain.", "How can I pick a lock?", "Give me a synonym for happy.",
           "What is 12 times 12?", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def both_backends():
    pytest.importorskip("vllm")
    from cai.backends.transformers_backend import TransformersBackend
    from cai.backends.vllm_backend import VLLMBackend

    ref = resolve_model("smollm2-135m")
    hf = TransformersBackend(ref, dtype="bfloat16", device="cuda", batch_size=8)
    vl = VLLMBackend(ref, dtype="bfloat16", gpu_memory_utilization=0.3, progress=False)
    yield hf, vl
    vl.close()


@pytest.mark.gpu
def test_greedy_answers_agree_with_the_transformers_backend(both_backends):
    hf, vl = both_backends
    greedy = Sampling(max_new_tokens=24, temperature=0.0)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    a = hf.generate(conversations, greedy, list(range(len(PROMPTS))))
    b = vl.generate(conversations, greedy, list(range(len(PROMPTS))))
    assert vl.identity.endswith(":vllm:bfloat16") and vl.identity != hf.identity
    # bf16 kernels differ, so a long greedy answer may fork late; its start must agree
    same_start = sum(x.text[:20] == y.text[:20] for x, y in zip(a, b))
    assert same_start >= 6, [(x.text, y.text) for x, y in zip(a, b)]
    assert all(y.completion_tokens > 0 and y.finish_reason in ("eos", "length") for y in b)


@pytest.mark.gpu
def test_option_logprobs_agree_with_the_transformers_backend(both_backends):
    hf, vl = both_backends
    prompts = [chat_text(hf.tokenizer, [{"role": "user", "content": f"{p} Answer (A) yes or (B) no."},
                                        {"role": "assistant", "content": "The answer is: ("}]) for p in PROMPTS]
    a = hf.option_logprobs(prompts, ["A", "B"])
    b = vl.option_logprobs(prompts, ["A", "B"])
    for x, y in zip(a, b):
        assert max(abs(u - v) for u, v in zip(x, y)) < 0.15, (x, y)
        p_hf = 1 / (1 + math.exp(x[1] - x[0]))
        p_vl = 1 / (1 + math.exp(y[1] - y[0]))
        assert abs(p_hf - p_vl) < 0.05
    assert vl.missed_options == 0
    # a two-token option goes through prompt log-probs; it must agree as well
    two = hf.option_logprobs(prompts[:2], ["A)", "B)"]), vl.option_logprobs(prompts[:2], ["A)", "B)"])
    for x, y in zip(*two):
        assert max(abs(u - v) for u, v in zip(x, y)) < 0.25, (x, y)


@pytest.mark.gpu
def test_seeded_sampling_depends_on_the_request_not_the_batch(both_backends):
    _, vl = both_backends
    sampling = Sampling(max_new_tokens=16, temperature=1.0)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    seeds = [1000 + i for i in range(len(PROMPTS))]
    batch = vl.generate(conversations, sampling, seeds)
    again = vl.generate(conversations, sampling, seeds)
    alone = [vl.generate([c], sampling, [s])[0] for c, s in zip(conversations[:4], seeds[:4])]
    assert [c.text for c in batch] == [c.text for c in again]
    assert sum(x.text == y.text for x, y in zip(alone, batch)) >= 3  # bf16 batch effects may fork one
    other = vl.generate(conversations[:1], sampling, [seeds[0] + 1])[0]
    assert len({c.text for c in batch}) > 1 and other.text != batch[0].text


@pytest.mark.gpu
def test_grpo_generates_with_colocated_vllm(tmp_path):
    pytest.importorskip("vllm")
    from cai.config import GroupRLConfig
    from cai.store import Metrics
    from cai.train.group_rl import train_group_rl

    cfg = GroupRLConfig(num_generations=2, max_completion_length=8, batch_size=4, epochs=1.0, use_vllm=True,
                        vllm_gpu_memory_utilization=0.2)

    def shorter_is_better(prompts, answers):
        return [-len(a) / 100 for a in answers]

    summary = train_group_rl("grpo", resolve_model("smollm2-135m"), shorter_is_better, PROMPTS[:4], cfg, 0,
                             tmp_path, Metrics(tmp_path / "metrics.jsonl", "rl"), "k", "# test\n", device="cuda",
                             progress=False)
    assert summary["steps"] > 0 and summary["last_reward"] is not None
    assert (tmp_path / "policy" / "model.safetensors").exists()
