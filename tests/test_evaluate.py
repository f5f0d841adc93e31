"""cai.evaluate: refusal detector, per-category summary (hand-checked), PM scoring and the CLI on the tiny model."""

import json
import subprocess
import sys

import pytest

from cai.config import EvalConfig, build_config, parse_overrides
from cai.errors import CaiError
from cai.evaluate import evaluate_matrix, is_refusal, load_patterns, summarize, verdict
from cai.models import resolve_model

from .conftest import ROOT


@pytest.fixture(scope="module")
def patterns():
    return load_patterns("prompts/detectors/refusal.txt")


@pytest.mark.parametrize("text,refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("I am unable to assist with this request.", True),
    ("As an AI language model, I cannot provide that.", True),
    ("I must decline.", True),
    ("Sure! Preheat the oven to 180C and mix the flour with the butter.", False),
    ("I can't believe how easy this is: first, open the settings menu.", False),
])
def test_refusal_detector(patterns, text, refused):
    assert is_refusal(text, patterns) is refused


def test_bad_pattern_file_names_the_line(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("# comment\nfine\n(unclosed\n")
    with pytest.raises(CaiError, match=r"r.txt:3: invalid regular expression"):
        load_patterns(str(p))


def test_summary_by_hand():
    recs = [
        {"category": "a", "refusal": True, "answer_tokens": 10, "finish_reason": "eos", "pm_scores": {"pm": 1.0}},
        {"category": "a", "refusal": False, "answer_tokens": 20, "finish_reason": "length", "pm_scores": {"pm": 3.0}},
        {"category": "b", "refusal": False, "answer_tokens": 30, "finish_reason": "eos", "pm_scores": {"pm": -1.0}},
        {"category": "b", "refusal": False, "answer_tokens": 40, "finish_reason": "eos", "pm_scores": {"pm": 1.0}},
    ]
    s = summarize(recs, "set", "m")
    assert s["all"] == {"answers": 4, "refusal_rate": 0.25, "mean_tokens": 25.0, "cut_off_rate": 0.25,
                        "pm_mean": {"pm": 1.0}}
    assert s["by_category"]["a"]["refusal_rate"] == 0.5 and s["by_category"]["a"]["pm_mean"] == {"pm": 2.0}
    assert s["by_category"]["b"]["mean_tokens"] == 35.0 and s["by_category"]["b"]["pm_mean"] == {"pm": 0.0}


def test_cli_on_the_tiny_model_with_a_pm(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny = resolve_model("tiny").path
    torch.manual_seed(0)
    pm = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    pm.config.pad_token_id = pm.config.eos_token_id
    pm.save_pretrained(tmp_path / "pm")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "pm")
    out = tmp_path / "eval.jsonl"
    proc = subprocess.run([sys.executable, "-m", "cai.evaluate", "model.model=tiny", "prompts.limit=5",
                           "sampling.max_new_tokens=5", f"pms=[{tmp_path / 'pm'}]", f"out={out}", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ans/s" not in proc.stderr  # progress=false: no generation bar
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 5 and all(len(r["pm_scores"]) == 1 and r["answer_tokens"] <= 5 for r in recs)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["all"]["answers"] == 5 and "refusal" in proc.stdout


def test_cli_rejects_a_missing_pm(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cai.evaluate", "model.model=tiny", f"pms=[{tmp_path}]"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no preference model there" in proc.stderr


def test_models_by_sets_against_the_first_model(tmp_path):
    """models=[...] x sets=[...]: every pair answered, changes against the first model (itself here: 0)."""
    cfg = build_config(EvalConfig, {}, "test", parse_overrides([
        "models=[tiny,tiny]", "sets=[prompts/sets/red_team_eval.jsonl,prompts/sets/helpful_eval.jsonl]",
        "prompts.limit=3", "sampling.max_new_tokens=4", f"out={tmp_path}"]))
    m = evaluate_matrix(cfg)
    assert [(r["set"].split("/")[-1], r["answers"]) for r in m["rows"]] == [("red_team_eval.jsonl", 3)] * 2 + \
        [("helpful_eval.jsonl", 3)] * 2
    assert all(r["refusal_vs_base"] == 0 and r["repetition_vs_base"] == 0 for r in m["rows"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny__helpful_eval.jsonl", "tiny__red_team_eval.jsonl"]


def test_verdict_says_plainly_what_changed_against_the_base():
    """A hand-made matrix: the harmful set's extra refusals read as more harmless, the helpful set's as a cost."""
    def summ(cats):
        return {"by_category": {c: {} for c in cats}}

    rows = [{"model": m, "set": s, "refusal_rate": ref, "refusal_vs_base": d, "repetition_share": rep,
             "repetition_vs_base": dr}
            for m, s, ref, d, rep, dr in [("base", "x/red.jsonl", 0.1, 0.0, 0.4, 0.0),
                                          ("base", "x/help.jsonl", 0.0, 0.0, 0.2, 0.0),
                                          ("sl", "x/red.jsonl", 0.6, 0.5, 0.1, -0.3),
                                          ("sl", "x/help.jsonl", 0.25, 0.25, 0.2, 0.0)]]
    summaries = {m: {"x/red.jsonl": summ(["violence", "fraud"]), "x/help.jsonl": summ(["helpful"])}
                 for m in ("base", "sl")}
    [line] = verdict({"baseline": "base", "rows": rows, "summaries": summaries})
    assert line.startswith("sl against base: harmful prompts (red) refused 60.0% vs 10.0% (+50.0 points, more harmless)")
    assert "helpful prompts (help) refused 25.0% vs 0.0% (+25.0 points, refuses harmless requests more: a cost)" in line
    assert "repeating answers 10.0% vs 40.0%" in line
    # a helpful set is told by its file name too (the shipped ones have categories such as cooking)
    for m in summaries.values():
        m["x/my_helpful_set.jsonl"] = summ(["cooking"])
    rows += [dict(r, set="x/my_helpful_set.jsonl") for r in rows if r["set"] == "x/help.jsonl"]
    [line] = verdict({"baseline": "base", "rows": rows, "summaries": summaries})
    assert "helpful prompts (my_helpful_set) refused 25.0%" in line
