"""Typed configs: shipped YAMLs, overrides, and the one-line error messages (also through the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cai.config import SLConfig, config_dict, help_text, load_config, stable_hash
from cai.errors import CaiError
from cai.io import YAML_MAX_ALIASES, YAML_MAX_BYTES, read_yaml
from cai.paths import PROJECT_ROOT

PIPELINES = sorted((PROJECT_ROOT / "pipelines").glob("*.yaml"))


def test_there_are_shipped_pipelines():
    assert {p.name for p in PIPELINES} >= {"sl.yaml", "demo_sl.yaml"}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config([f"config={path}"])
    import yaml

    assert cfg.stage == yaml.safe_load(path.read_text())["stage"] and cfg.stage in ("sl", "rl", "dpo")
    if cfg.stage == "sl":
        assert isinstance(cfg.critique.rounds, int) and isinstance(cfg.sampling.temperature, float)
    else:
        raw = yaml.safe_load(path.read_text())
        assert isinstance(cfg.feedback.principles_per_pair, int) and cfg.policy.model == raw["policy"]["model"]


@pytest.mark.parametrize("pair", [("rlhf", "rlaif"), ("demo_rlhf", "demo_rlaif")])
def test_rlhf_and_rlaif_configs_differ_only_in_label_source(pair):
    a, b = (config_dict(load_config([f"config={PROJECT_ROOT / 'pipelines' / f'{n}.yaml'}"])) for n in pair)
    assert (a["feedback"].pop("source"), b["feedback"].pop("source")) == ("human", "ai")
    a.pop("run"), b.pop("run")
    assert a == b


def test_demo_yaml_values_are_applied():
    cfg = load_config([f"config={PROJECT_ROOT / 'pipelines' / 'demo_sl.yaml'}"])
    # the demo runs the quality recipe at demo size (issue 11): context distillation, no critique rounds
    assert (cfg.run, cfg.critique.rounds, cfg.critique.few_shot, cfg.red_team.limit) == ("demo", 0, 0, 32)
    assert cfg.sft.max_length == 384 and cfg.sft.helpful_ratio == 1.0 and cfg.sft.data == "contrast"
    assert cfg.red_team.column == "prompt"  # a default the file does not set


def test_stage_sl_loads_pipelines_sl_yaml():
    cfg = load_config(["stage=sl"])
    assert cfg.run == "default"  # from pipelines/sl.yaml
    assert cfg.critique.rounds == 4 and cfg.sampling.max_new_tokens == 128
    assert cfg.generator.model == "smollm2-135m"


def test_nested_overrides_apply_and_are_typed():
    cfg = load_config(["stage=sl", "critique.rounds=2", "sampling.temperature=1", "red_team.limit=5",
                       "train=false", "generator.model=tiny", "run=r1"])
    assert cfg.critique.rounds == 2 and type(cfg.critique.rounds) is int
    assert cfg.sampling.temperature == 1.0 and type(cfg.sampling.temperature) is float
    assert cfg.red_team.limit == 5
    assert cfg.train is False
    assert cfg.generator.model == "tiny" and cfg.run == "r1"
    # untouched siblings keep their YAML / default values
    assert cfg.critique.few_shot == 2 and cfg.sampling.top_p == 0.9


def test_later_override_wins():
    assert load_config(["stage=sl", "critique.rounds=2", "critique.rounds=3"]).critique.rounds == 3


def test_config_is_read_only():
    cfg = load_config(["stage=sl"])
    with pytest.raises(Exception):  # noqa: B017 - any error will do: the config must not change
        cfg.critique.rounds = 9


def test_unknown_override_key_suggests_close_match():
    with pytest.raises(CaiError) as e:
        load_config(["stage=sl", "critique.roundz=2"])
    assert "unknown key 'critique.roundz'" in str(e.value)
    assert "did you mean 'critique.rounds'" in str(e.value)


def test_unknown_key_in_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("stage: sl\nsampling:\n  temprature: 0.5\n", encoding="utf-8")
    with pytest.raises(CaiError) as e:
        load_config([f"config={path}"])
    msg = str(e.value)
    assert msg.startswith(str(path))
    assert "unknown key 'sampling.temprature'" in msg and "did you mean 'sampling.temperature'" in msg


def test_wrong_type_names_the_key():
    with pytest.raises(CaiError) as e:
        load_config(["stage=sl", "sampling.temperature=hot"])
    assert "'sampling.temperature'" in str(e.value) and "hot" in str(e.value)


def test_wrong_type_in_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "typed.yaml"
    path.write_text("stage: sl\ncritique:\n  rounds: many\n", encoding="utf-8")
    with pytest.raises(CaiError) as e:
        load_config([f"config={path}"])
    assert str(e.value).startswith(str(path)) and "critique.rounds" in str(e.value)


def test_group_given_a_scalar_is_an_error():
    with pytest.raises(CaiError, match="'critique' is a group of settings"):
        load_config(["stage=sl", "critique=3"])


def test_unknown_stage_suggests_close_match():
    with pytest.raises(CaiError, match=r"stage=sll: no such stage; did you mean 'sl'\?"):
        load_config(["stage=sll"])


def test_no_stage_is_an_error():
    with pytest.raises(CaiError, match="no stage given"):
        load_config(["critique.rounds=2"])


def test_yaml_syntax_error_gives_file_line_col(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stage: sl\nsampling:\n  temperature: [0.5\n  top_p: 0.9\n", encoding="utf-8")
    with pytest.raises(CaiError) as e:
        load_config([f"config={path}"])
    assert str(e.value).startswith(f"{path}:4:")
    assert ": YAML syntax error:" in str(e.value)


def test_yaml_syntax_error_exact_position(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("stage: sl\nrun: \"unclosed\n", encoding="utf-8")
    with pytest.raises(CaiError) as e:
        load_config([f"config={path}"])
    assert str(e.value).startswith(f"{path}:3:1: YAML syntax error")


def test_config_file_for_another_stage_is_rejected(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("stage: rl\n", encoding="utf-8")
    with pytest.raises(CaiError, match="this file is for stage=rl"):
        load_config([f"config={path}", "stage=sl"])
    path.write_text("stage: rlhf\n", encoding="utf-8")
    with pytest.raises(CaiError, match="no such stage"):
        load_config([f"config={path}"])


def test_missing_config_file(tmp_path):
    with pytest.raises(CaiError, match="config file not found"):
        load_config([f"config={tmp_path / 'absent.yaml'}"])


@pytest.mark.parametrize("arg", ["critique.rounds", "=3"])
def test_argument_without_key_value_is_an_error(arg):
    with pytest.raises(CaiError, match=f"argument '{arg}': expected key=value"):
        load_config(["stage=sl", arg])


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cai.pipeline", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_override_exits_2_with_one_error_line():
    p = _cli("stage=sl", "critique.roundz=2")
    assert p.returncode == 2
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error:")
    assert "did you mean 'critique.rounds'" in lines[0]
    assert p.stdout == ""


def test_cli_help_lists_settings():
    p = _cli("--help")
    assert p.returncode == 0, p.stderr
    assert "critique.rounds (int, default 4)" in p.stdout
    assert "sampling.temperature" in p.stdout


def test_help_text_has_a_line_per_leaf_setting():
    lines = help_text(SLConfig)
    assert any(line.strip().startswith("red_team.limit (") for line in lines)
    assert all(": " in line for line in lines)


def test_stable_hash_is_key_order_independent():
    a = {"x": 1, "y": {"b": [1, 2], "a": "s"}}
    b = {"y": {"a": "s", "b": [1, 2]}, "x": 1}
    assert stable_hash(a) == stable_hash(b)
    assert len(stable_hash(a)) == 24 and len(stable_hash(a, n=8)) == 8
    assert stable_hash(a) != stable_hash({**a, "x": 2})
    assert stable_hash({"y": {"b": [2, 1], "a": "s"}, "x": 1}) != stable_hash(a)  # list order matters


def test_config_yaml_duplicate_key_is_an_error_at_its_line(tmp_path):
    """yaml.safe_load kept the last of two equal keys without a word; a pipeline file's duplicate is refused."""
    path = tmp_path / "dup.yaml"
    path.write_text("stage: sl\nsampling:\n  temperature: 0.5\n  top_p: 0.9\n  temperature: 0.7\n", encoding="utf-8")
    with pytest.raises(CaiError) as e:
        load_config([f"config={path}"])
    assert str(e.value).startswith(f"{path}:5:3: sampling.temperature: duplicate key 'temperature' (first at line 3")
    assert "\n" not in str(e.value)


def test_config_yaml_has_the_constitution_loaders_limits(tmp_path):
    bomb = tmp_path / "bomb.yaml"  # "billion laughs": 90 aliases expanding to 10**9 values
    lines = ["stage: sl", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CaiError, match=r"bomb.yaml:\d+:\d+: this expands to more than"):
        load_config([f"config={bomb}"])
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("stage: sl\nx: &s 1\ny: [" + ", ".join(["*s"] * (YAML_MAX_ALIASES + 1)) + "]\n")
    with pytest.raises(CaiError, match=rf"aliases.yaml:3:\d+: more than {YAML_MAX_ALIASES} YAML aliases"):
        load_config([f"config={aliases}"])
    big = tmp_path / "big.yaml"
    big.write_text("stage: sl\n#" + "x" * YAML_MAX_BYTES + "\n")
    with pytest.raises(CaiError, match=r"big.yaml: file is \d+ bytes, over the 1048576-byte \(1 MiB\) limit"):
        load_config([f"config={big}"])
    with pytest.raises(CaiError, match=r"only plain YAML"):
        tag = tmp_path / "tag.yaml"
        tag.write_text("stage: !!python/object/apply:os.system [echo]\n")
        read_yaml(tag)
