"""`python benchmarks/bench.py` on the tiny model with tiny sizes: every section but demo, its JSON, its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CAI_THREADS": "1"}
TINY = ["model=tiny", "gen_prompts=3", "gen_tokens=3", "label_pairs=2", "principles=2", "accuracy_pairs=4",
        "matmul_size=128", "ppo_steps=2", "ppo_variants=full,lora", "repeats=2", "progress=false"]


def bench(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = bench("sections=gen,label,roofline,accuracy,ppo", *TINY, f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_ratio_is_the_quotient_of_rates_measured_in_the_run(results):
    r, _ = results
    g, lb, rf = r["gen"], r["label"], r["roofline"]
    assert g["fast_tokens"] == g["naive_tokens"] == 3 * 3  # EOS ignored on both paths: exactly gen_tokens each
    assert g["fast_tok_s"] == pytest.approx(g["fast_tokens"] / g["fast_seconds"])
    assert g["naive_tok_s"] == pytest.approx(g["naive_tokens"] / g["naive_seconds"])
    assert g["ratio"] == pytest.approx(g["fast_tok_s"] / g["naive_tok_s"])
    assert lb["labels"] == 2 * 2 and lb["scored_prompts"] == 2 * 2 * 2
    assert lb["ratio"] == pytest.approx(lb["fast_labels_s"] / lb["naive_labels_s"])
    assert lb["fast_labels_s"] == pytest.approx(lb["labels"] / lb["fast_seconds"])
    assert lb["naive_labels_s"] == pytest.approx(lb["labels"] / lb["naive_seconds"])
    dt = rf["label_dtype"]
    assert rf["roofline_tok_s"][dt] == pytest.approx(rf["matmul_gflop_s"][dt] * 1e9 / rf["flops_per_token"])
    assert rf["label_share"] == pytest.approx(lb["forward_tok_s"] / rf["roofline_tok_s"][dt])
    assert all(v > 0 for v in (g["ratio"], lb["ratio"], rf["label_share"], *rf["matmul_gflop_s"].values()))


def test_labeling_runs_each_shared_prefix_once_and_agrees_with_the_naive_labeler(results):
    lb = results[0]["label"]
    assert lb["forward_tokens"] < 0.8 * lb["prompt_tokens"]  # K=2 questions per pair and order share the prefix
    assert lb["max_p_option_a_diff_vs_naive"] < 0.05  # bf16 fast path vs fp32 naive


def test_flops_per_token_follows_the_formula(results):
    rf = results[0]["roofline"]
    from cai.models import TINY_CONFIG

    h, i, layers = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"], TINY_CONFIG["num_hidden_layers"]
    kv = h // TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["num_key_value_heads"]
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h  # q,o + k,v + MLP + 2 norms, final norm
    assert rf["flops_per_token"] == pytest.approx(2 * params + 2 * layers * rf["context"] * h)


def test_accuracy_ppo_targets_and_report(results):
    r, stdout = results
    acc = r["accuracy"]
    assert acc["pairs"] == 4 and len(acc["templates"]) == 2
    for t in acc["templates"].values():
        assert 0 <= t["accuracy"] <= 1 and 0 <= t["position_consistency"] <= 1
        assert set(t["by_category"]) == {"harmless", "helpful"}
    assert set(r["ppo"]) == {"full", "lora"}
    for p in r["ppo"].values():
        assert p["steps"] == len(p["step_seconds"]) == 2 and 0 < p["peak_rss_gb"] < 6
    assert r["ppo"]["lora"]["lora"] and r["ppo"]["lora"]["shared_reference"] and not r["ppo"]["full"]["lora"]
    names = [t["name"] for t in r["targets"]]
    assert len(names) == 5 and all(isinstance(t["met"], bool) for t in r["targets"])
    assert "PPO peak RSS, LoRA (GB)" in names
    assert r["machine"]["cores"] >= 1 and "torch" in r["machine"]
    for name in names:
        assert name in stdout


def test_help_and_bad_input_fail_in_one_line(tmp_path):
    proc = bench("--help", timeout=60)
    assert proc.returncode == 0 and "sections" in proc.stdout and "gen_tokens" in proc.stdout
    proc = bench("sections=gen,typo", "model=tiny", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "sections=gen,typo" in proc.stderr
    proc = bench("sections=ppo", "model=tiny", "ppo_variants=full,loar", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "ppo_variants=full,loar" in proc.stderr
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"id": "x", "category": "harmless", "prompt": "p", "better": "b"}\n')
    proc = bench("sections=accuracy", "model=tiny", f"labeled_set={bad}", f"out={tmp_path / 'b.json'}", timeout=60)
    assert proc.returncode == 2 and f"{bad}:1:" in proc.stderr and "worse" in proc.stderr
    assert not (tmp_path / "b.json").exists()
