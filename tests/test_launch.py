"""Stages under `accelerate launch` with two real processes (gloo on CPU, pipelines/accelerate/cpu_ddp.yaml).

A launched stage=sl run must be the same run as a single-process one: one store with the same records, the same
SFT data, one model saved by one process, metrics written once, and the training data split across the two
processes (fewer steps). The slow test runs stage=rl (labels, PM, PPO, two rounds) the same way.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cai.launch import on_main, sharded_launch
from cai.pipeline import main

from .conftest import ASSETS, ROOT

CPU_DDP = ROOT / "pipelines" / "accelerate" / "cpu_ddp.yaml"


def sl_args(tmp_path, run, **over):
    args = {"stage": "sl", "run": run, "runs_dir": str(tmp_path / "runs"),
            "constitution": str(tmp_path / "constitution.yaml"), "generator.model": "tiny",
            "generator.batch_size": 2, "sampling.max_new_tokens": 8, "red_team.limit": 6, "critique.rounds": 2,
            "critique.few_shot": 1, "sft.helpful_ratio": 0.5, "sft.batch_size": 2, "progress": False}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def run_cmd(cmd, tmp_path):
    env = {**os.environ, "CAI_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def launch(tmp_path, args):
    accelerate = Path(sys.executable).with_name("accelerate")
    return run_cmd([str(accelerate), "launch", "--config_file", str(CPU_DDP), "--num_processes", "2",
                    "-m", "cai.pipeline", *args], tmp_path)


def records(path):
    """The store's records without their timing field (the only one that differs between runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in Path(path).read_text().splitlines()]


@pytest.mark.slow  # the longest tiny-model runs go to `make test-slow`
def test_launched_sl_run_matches_a_single_process_run(tmp_path):
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", tmp_path / "constitution.yaml")
    single = run_cmd([sys.executable, "-m", "cai.pipeline", *sl_args(tmp_path, "single")], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = launch(tmp_path, sl_args(tmp_path, "launched"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = tmp_path / "runs" / "single", tmp_path / "runs" / "launched"

    steps = records(two / "sl" / "steps.jsonl")
    assert len(steps) == len({r["key"] for r in steps}) > 0  # one store, no record twice
    assert sorted(steps, key=lambda r: r["key"]) == sorted(records(one / "sl" / "steps.jsonl"), key=lambda r: r["key"])
    assert (two / "sl" / "sft.jsonl").read_text() == (one / "sl" / "sft.jsonl").read_text()
    assert launched.stdout.count("SL-CAI generation") == 1  # one summary, from the main process

    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert sum("sl/train/final_loss" in m for m in metrics) == 1  # logged once, not once per process
    assert sum("sl/generate/texts_generated" in m for m in metrics) == 1
    assert sorted(p.name for p in (two / "sl").iterdir()) == sorted(p.name for p in (one / "sl").iterdir())
    info = json.loads((two / "sl" / "model" / "cai_train.json").read_text())
    single_info = json.loads((one / "sl" / "model" / "cai_train.json").read_text())
    assert info["key"] == single_info["key"]  # same data, base and settings
    assert info["steps"] < single_info["steps"]  # each process took half of every batch of examples
    assert (two / "sl" / "model" / "model.safetensors").exists()

    # a rerun reuses every record and the model on both processes, and adds nothing
    again = launch(tmp_path, sl_args(tmp_path, "launched"))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((two / "sl" / "summary.json").read_text())
    assert summary["generated"] == 0 and summary["train"]["reused"]
    assert len(records(two / "sl" / "steps.jsonl")) == len(steps)


def test_a_bad_input_found_by_the_main_process_stops_every_process_with_one_line(tmp_path):
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", tmp_path / "constitution.yaml")
    # no prompts at all: the main process finds no SFT example after generating (inside cai.launch.on_main)
    out = launch(tmp_path, sl_args(tmp_path, "empty", **{"red_team.limit": 0, "sft.helpful_ratio": 0}))
    assert out.returncode != 0
    assert out.stderr.count("error: no SFT example") == 1, out.stderr[-3000:]
    assert not (tmp_path / "runs" / "empty" / "sl" / "model").exists()


def test_sharded_launch_names_configs_that_split_weights(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    assert sharded_launch() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert sharded_launch() is None
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert sharded_launch() == "DeepSpeed ZeRO-3"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded_launch() == "FSDP"


def test_on_main_runs_the_function_once_without_a_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    assert on_main(lambda: calls.append(1) or "done") == "done"
    assert calls == [1]


def test_stage_rl_refuses_a_sharding_launch_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit) as e:
        main(["stage=rl", f"runs_dir={tmp_path / 'runs'}", "policy.model=tiny", "algorithm=ppo"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage=rl under FSDP" in err[0] and "ddp.yaml" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # ~35 s on 2 cores: two rounds of labels, PM and PPO in two processes
def test_launched_rl_rounds_with_ppo(tmp_path):
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", tmp_path / "constitution.yaml")
    args = {"stage": "rl", "run": "r", "runs_dir": str(tmp_path / "runs"),
            "constitution": str(tmp_path / "constitution.yaml"), "policy.model": "tiny",
            "feedback.labeler.model": "tiny", "feedback.principles_per_pair": 2, "pair_sampling.max_new_tokens": 6,
            "red_team.limit": 6, "helpful.limit": 2, "pm.batch_size": 4, "pm.eval_fraction": 0.25, "ppo.steps": 2,
            "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 2, "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 6,
            "rounds": 2, "progress": False}
    out = launch(tmp_path, [f"{k}={v}" for k, v in args.items()])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("RL-CAI") == 1
    rl = tmp_path / "runs" / "r" / "rl"
    keys = [json.loads(line)["key"] for line in (rl / "steps.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 2 * (8 * 2 + 8 * 2 * 2)  # per round: 16 answers, 32 label scores
    assert len((rl / "comparisons.jsonl").read_text().splitlines()) == 16
    for r in (1, 2):
        assert (rl / f"round-{r}" / "pm" / "model.safetensors").exists()
        assert (rl / f"round-{r}" / "policy" / "model.safetensors").exists()
        assert sorted(p.name for p in (rl / f"round-{r}").iterdir()) == [
            "comparisons.jsonl", "label_diagnostics.json", "pm", "policy"]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum("rl/ppo/kl" in m for m in metrics) == 2 * 2  # rounds x steps, logged by one process
    assert sum("rl/labels/pairs" in m for m in metrics) == 2
