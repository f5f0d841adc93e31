"""cai.io: JSONL split on "\\n" only, duplicate keys and deep nesting refused, atomic writes; the run lock on a file
system without flock; PPO-ptx data found from the policy's run."""

from __future__ import annotations

import errno
import fcntl
import json

import pytest

from cai.errors import CaiError
from cai.io import has_lone_surrogate, json_objects, parse_json, read_jsonl, write_atomic, write_jsonl_atomic
from cai.runs import RunLock


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    rows = [{"answer": "one\u2028two\u2029three\u0085four\x1cfive"}, {"answer": "plain"}]
    path = tmp_path / "x.jsonl"
    write_jsonl_atomic(path, rows)
    assert read_jsonl(path) == rows  # str.splitlines would have cut the first row in five
    assert [n for n, _ in json_objects(path)] == [1, 2]


def test_jsonl_refuses_duplicate_keys_and_deep_nesting_naming_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 1, "a": 2}\n')
    with pytest.raises(CaiError, match=r"x\.jsonl:2: invalid JSON \(key 'a' appears twice"):
        read_jsonl(path)
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(CaiError, match=r"x\.jsonl:1: invalid JSON \(nested too deeply\)"):
        read_jsonl(path)


def test_crlf_lines_and_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "d" / "f.txt"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_run_lock_on_a_file_system_without_flock(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(CaiError, match="this file system cannot lock files"):
        with RunLock(tmp_path / "run"):
            pass


def test_ptx_data_comes_from_the_run_the_policy_was_trained_in(tmp_path):
    from cai.config import load_config
    from cai.stages.pairs import ptx_data_path, ptx_examples

    other = tmp_path / "runs" / "other" / "sl"
    (other / "model").mkdir(parents=True)
    rl = lambda *o: load_config(["stage=rl", "run=r", f"runs_dir={tmp_path / 'runs'}", "ppo.ptx_coef=0.1", *o])  # noqa: E731
    assert ptx_data_path(rl(), tmp_path / "runs" / "r") == tmp_path / "runs" / "r" / "sl" / "sft.jsonl"
    assert ptx_data_path(rl(f"policy.model={other / 'model'}"), tmp_path / "runs" / "r") == other / "sft.jsonl"
    with pytest.raises(CaiError, match="set ppo.ptx_data=FILE"):
        ptx_data_path(rl("policy.model=tiny"), tmp_path / "runs" / "r")
    with pytest.raises(CaiError, match="does not exist; run stage=sl first"):
        ptx_examples(other / "sft.jsonl")
    (other / "sft.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}],
                                                 "completion": [{"role": "assistant", "content": "a"}]}) + "\n")
    assert ptx_examples(other / "sft.jsonl")[0]["completion"][0]["content"] == "a"


def test_metrics_cut_a_torn_last_line_before_appending(tmp_path):
    from cai.store import Metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x"')  # killed mid-write
    Metrics(path, "rl").log({"rl/x": 3}, step=2)
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["rl/x"] == 3


def test_curves_of_a_resumed_run_replace_the_steps_logged_again(tmp_path):
    from cai.compare import Run, rl_curves

    rows = [(1, 0.1), (2, 0.2), (3, 0.3), (3, 0.35), (4, 0.4),  # killed after step 3, resumed from step 2
            (1, 0.5), (2, 0.6)]  # a new job (round 2)
    write_jsonl_atomic(tmp_path / "metrics.jsonl", [{"step": s, "rl/ppo/reward_mean": r, "rl/ppo/kl": 0.0}
                                                    for s, r in rows])
    curves = rl_curves(Run("r", tmp_path, {}))
    assert [c["steps"] for c in curves] == [[1, 2, 3, 4], [1, 2]]
    assert curves[0]["reward"] == [0.1, 0.2, 0.35, 0.4]


def test_report_markdown_shows_model_html_as_text_and_json_has_no_nan():
    from cai.report import finite_json, render_markdown

    md = render_markdown([("h1", "r"), ("p", "answer: <img src=x onerror=alert(1)>"),
                          ("table", ["model", "phrase"], [["a", "<script>x</script> | y"]])])
    assert "<img" not in md and "<script>" not in md and "&lt;script&gt;" in md and "\\|" in md
    assert finite_json({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {"a": None, "b": [1.0, None],
                                                                                       "c": "x"}


def test_pickled_weights_are_refused_and_every_file_counts_in_the_identity(tmp_path, monkeypatch):
    from cai.models import resolve_model

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CaiError, match=r"weights are not safetensors \(pytorch_model.bin\).*CAI_ALLOW_PICKLE_WEIGHTS"):
        resolve_model(str(d))
    monkeypatch.setenv("CAI_ALLOW_PICKLE_WEIGHTS", "1")
    first = resolve_model(str(d)).identity
    (d / "modeling_custom.py").write_text("print('hi')\n")  # code beside the weights changes what would run
    assert resolve_model(str(d)).identity != first


def test_lone_surrogates_are_found_at_any_depth():
    assert has_lone_surrogate(parse_json('{"a": [1, {"b": "x\\ud800"}]}'))
    assert has_lone_surrogate(parse_json('{"\\udfff": 1}'))  # in a key
    nested = parse_json("[" * 500 + '"\\ud83d"' + "]" * 500)
    assert has_lone_surrogate(nested)
    assert not has_lone_surrogate(parse_json('{"a": ["\\ud83d\\ude00", "é", 1.5, null, true]}'))  # a valid pair
