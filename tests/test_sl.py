"""stage=sl on the tiny model: full run, incremental reruns with exact counts, kill-and-resume, the lock."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cai.errors import CaiError
from cai.pipeline import main
from cai.runs import RunLock

from .conftest import ASSETS, ROOT

ROUNDS = 2


@pytest.fixture
def constitution(tmp_path):
    path = tmp_path / "constitution.yaml"
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", path)
    return path


def sl_args(tmp_path, constitution, run="r", **over):
    args = {
        "stage": "sl", "run": run, "runs_dir": str(tmp_path / "runs"), "constitution": str(constitution),
        "generator.model": "tiny", "generator.batch_size": 2, "sampling.max_new_tokens": 8,
        "red_team.limit": 6, "critique.rounds": ROUNDS, "critique.few_shot": 1, "sft.helpful_ratio": 0.5,
        "train": False, "progress": False,
    }
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def summary(tmp_path, run="r"):
    return json.loads((tmp_path / "runs" / run / "sl" / "summary.json").read_text())


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_full_sl_stage_trains_a_model(tmp_path, constitution):
    main(sl_args(tmp_path, constitution, train=True, report_to="tensorboard",
                 **{"sft.batch_size": 4, "sft.learning_rate": 1e-3}))
    run = tmp_path / "runs" / "r"
    chains = read_jsonl(run / "sl" / "chains.jsonl")
    assert len(chains) == 6 and all(len(c["rounds"]) == ROUNDS for c in chains)
    principle_ids = {"harmful", "rude", "evasive_answer"}
    for c in chains:
        assert c["initial_answer"] and c["model"].startswith("tiny@")
        assert [r["round"] for r in c["rounds"]] == [1, 2]
        assert {r["principle_id"] for r in c["rounds"]} <= principle_ids
        assert c["completion_tokens"] > 0 and c["constitution"]["name"] == "test-good"

    import datasets

    sft = datasets.load_dataset("json", data_files=str(run / "sl" / "sft.jsonl"), split="train")
    assert sft.num_rows == len([c for c in chains if c["rounds"][-1]["revision"].strip()]) + 3
    assert sorted(set(sft["source"])) == ["helpful", "revision"]
    assert sft[0]["completion"][0]["role"] == "assistant"

    model_dir = run / "sl" / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    card = (model_dir / "README.md").read_text()
    const_sha = hashlib.sha256(constitution.read_bytes()).hexdigest()
    assert const_sha in card and "test-good" in card
    assert (run / "constitution.sha256").read_text().strip() == const_sha
    assert yaml.safe_load((run / "config.sl.yaml").read_text())["critique"]["rounds"] == ROUNDS
    metrics = read_jsonl(run / "metrics.jsonl")
    assert any("sl/train/loss" in m for m in metrics)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # the same metrics, as TensorBoard scalars
    assert any(m.get("sl/generate/texts_generated") == 6 + 3 + 6 * 2 * ROUNDS for m in metrics)

    # the weights changed
    from safetensors.torch import load_file

    from cai.models import resolve_model

    before = load_file(Path(resolve_model("tiny").path) / "model.safetensors")
    after = load_file(model_dir / "model.safetensors")
    changed = [k for k in after if k in before and not (after[k].float() == before[k].float()).all()]
    assert len(changed) > len(after) // 2

    # a rerun with nothing changed reuses everything, including the trained model
    main(sl_args(tmp_path, constitution, train=True, **{"sft.batch_size": 4, "sft.learning_rate": 1e-3}))
    s = summary(tmp_path)
    assert s["generated"] == 0 and s["chains_reused"] == 6 and s["train"]["reused"] is True


def test_editing_one_principle_regenerates_only_what_used_it(tmp_path, constitution):
    main(sl_args(tmp_path, constitution))
    before = read_jsonl(tmp_path / "runs" / "r" / "sl" / "chains.jsonl")
    uses = {}
    for c in before:
        for r in c["rounds"]:
            uses.setdefault(r["principle_id"], set()).add(c["prompt_id"])
    # a principle used by some chains but not all
    target = next(p for p, chains in sorted(uses.items()) if 0 < len(chains) < len(before))
    first_use = {c["prompt_id"]: min((r["round"] for r in c["rounds"] if r["principle_id"] == target), default=None)
                 for c in before}
    exp_chains = sum(v is not None for v in first_use.values())
    exp_rounds = sum(ROUNDS - v + 1 for v in first_use.values() if v is not None)

    data = yaml.safe_load(constitution.read_text())
    for p in data["critique_revision"]:
        if p["id"] == target:
            p["critique"] += " Be specific."
    constitution.write_text(yaml.safe_dump(data, sort_keys=False))
    main(sl_args(tmp_path, constitution))

    s = summary(tmp_path)
    assert (s["chains_regenerated"], s["chains_reused"]) == (exp_chains, 6 - exp_chains)
    assert (s["rounds_regenerated"], s["rounds_reused"]) == (exp_rounds, 6 * ROUNDS - exp_rounds)
    after = {c["prompt_id"]: c for c in read_jsonl(tmp_path / "runs" / "r" / "sl" / "chains.jsonl")}
    for c in before:
        new = after[c["prompt_id"]]
        assert new["initial_answer"] == c["initial_answer"]
        first = first_use[c["prompt_id"]]
        keep = ROUNDS if first is None else first - 1
        assert new["rounds"][:keep] == c["rounds"][:keep]  # untouched rounds: same keys and texts
        for old_r, new_r in zip(c["rounds"][keep:], new["rounds"][keep:]):
            assert old_r["critique_key"] != new_r["critique_key"]
        assert [r["principle_id"] for r in new["rounds"]] == [r["principle_id"] for r in c["rounds"]]


def test_adding_prompts_changing_rounds_and_model(tmp_path, constitution):
    main(sl_args(tmp_path, constitution))
    main(sl_args(tmp_path, constitution, **{"red_team.limit": 8}))  # two more prompts
    s = summary(tmp_path)
    assert (s["chains_regenerated"], s["chains_reused"]) == (2, 6)
    assert (s["rounds_regenerated"], s["rounds_reused"]) == (2 * ROUNDS, 6 * ROUNDS)

    main(sl_args(tmp_path, constitution, **{"red_team.limit": 8, "critique.rounds": ROUNDS + 1}))  # one more round
    s = summary(tmp_path)
    assert (s["chains_regenerated"], s["rounds_regenerated"], s["rounds_reused"]) == (8, 8, 8 * ROUNDS)

    # a different model (same architecture, one config byte changed) invalidates everything
    from cai.models import resolve_model

    other = tmp_path / "other-model"
    shutil.copytree(resolve_model("tiny").path, other)
    (other / "cai_identity.json").unlink()
    cfg = json.loads((other / "config.json").read_text())
    cfg["initializer_range"] = 0.03  # not used at inference: same outputs, different identity
    (other / "config.json").write_text(json.dumps(cfg))
    main(sl_args(tmp_path, constitution, **{"red_team.limit": 8, "generator.model": str(other)}))
    s = summary(tmp_path)
    assert (s["chains_regenerated"], s["chains_reused"], s["reused"]) == (8, 0, 0)


def _run_and_kill(args, steps_path, kill_at, timeout=120):
    """Start the stage in a subprocess; SIGKILL it once steps.jsonl has `kill_at` records. Returns the code."""
    proc = subprocess.Popen([sys.executable, "-m", "cai.pipeline", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if steps_path.exists() and steps_path.read_bytes().count(b"\n") >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=timeout)
    return proc.returncode, proc.stderr.read().decode()


def test_kill_and_resume_gives_exactly_the_uninterrupted_records(tmp_path, constitution):
    ref_args = sl_args(tmp_path, constitution, run="ref")
    main(ref_args)
    ref_dir = tmp_path / "runs" / "ref" / "sl"
    total = len(read_jsonl(ref_dir / "steps.jsonl"))
    assert total == 6 + 3 + 6 * 2 * ROUNDS

    args = sl_args(tmp_path, constitution, run="killed")
    steps = tmp_path / "runs" / "killed" / "sl" / "steps.jsonl"
    codes = []
    for kill_at in (1, 10, 20):  # during the answers, round 1, and round 2
        code, err = _run_and_kill(args, steps, kill_at)
        codes.append(code)
    assert codes.count(-signal.SIGKILL) >= 2, codes  # the kills really interrupted the runs
    done = subprocess.run([sys.executable, "-m", "cai.pipeline", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    out_dir = tmp_path / "runs" / "killed" / "sl"
    step_keys = [r["key"] for r in read_jsonl(out_dir / "steps.jsonl")]
    assert len(step_keys) == len(set(step_keys)) == total  # nothing lost, nothing duplicated
    assert without_timing(read_jsonl(out_dir / "chains.jsonl")) == without_timing(read_jsonl(ref_dir / "chains.jsonl"))
    assert (out_dir / "sft.jsonl").read_bytes() == (ref_dir / "sft.jsonl").read_bytes()
    assert not list((out_dir / "plans").glob("*.json"))  # finished waves leave no plan behind


def test_kill_during_training_resumes_from_checkpoint(tmp_path, constitution):
    args = sl_args(tmp_path, constitution, run="t", train=True,
                   **{"sft.batch_size": 1, "sft.save_steps": 1, "sft.epochs": 2})
    ckpts = tmp_path / "runs" / "t" / "sl" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "cai.pipeline", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if list(ckpts.glob("*/checkpoint-*/trainer_state.json")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "runs" / "t" / "sl" / "model").exists()
    main(args)
    s = summary(tmp_path, "t")
    assert s["train"]["resumed_from"] and "checkpoint-" in s["train"]["resumed_from"]
    assert s["train"]["steps"] == 2 * s["sft_examples"]
    assert (tmp_path / "runs" / "t" / "sl" / "model" / "model.safetensors").exists()
    assert not ckpts.joinpath(s["train"]["key"]).exists()  # checkpoints are cleared once the model is saved


def test_lock_stops_a_second_writer(tmp_path, constitution, capsys):
    run_dir = tmp_path / "runs" / "r"
    with RunLock(run_dir):
        with pytest.raises(SystemExit) as e:
            main(sl_args(tmp_path, constitution))
        assert e.value.code == 2
        assert f"in use by pid {os.getpid()}" in capsys.readouterr().err
        with pytest.raises(CaiError):
            RunLock(run_dir).__enter__()
    assert not (run_dir / "sl").exists()  # nothing was written by the refused process
    main(sl_args(tmp_path, constitution))  # the lock is free again


def test_bad_input_exits_2_and_leaves_the_run_intact(tmp_path, constitution):
    main(sl_args(tmp_path, constitution))
    run = tmp_path / "runs" / "r"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    constitution.write_text(constitution.read_text().replace("id: rude", "id: Rude Words"))
    proc = subprocess.run([sys.executable, "-m", "cai.pipeline", *sl_args(tmp_path, constitution)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(constitution) in err[0] and "critique_revision[1].id" in err[0]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_sl_on_the_bundled_model(tmp_path):
    main(["stage=sl", "run=slow", f"runs_dir={tmp_path}", "red_team.limit=4", "critique.rounds=1",
          "sampling.max_new_tokens=32", "sft.helpful_ratio=0.5", "sft.batch_size=2", "progress=false"])
    s = json.loads((tmp_path / "slow" / "sl" / "summary.json").read_text())
    assert s["chains_regenerated"] == 4 and s["train"]["steps"] >= 1
    chains = read_jsonl(tmp_path / "slow" / "sl" / "chains.jsonl")
    # the real model writes words: most tokens decode to ASCII letters and spaces
    text = " ".join(c["rounds"][0]["revision"] for c in chains)
    assert sum(ch.isalpha() or ch.isspace() for ch in text) > 0.8 * len(text)


def test_partly_written_batch_is_replayed_whole(tmp_path):
    """Control flow of the batch plan, on the fake backend: a batch with a missing record is regenerated as the
    same whole batch (same neighbours, so the same floats on a real model), and only the missing record is stored."""
    from cai.backends import Sampling
    from cai.backends.fake import FakeBackend
    from cai.store import JsonlStore
    from cai.waves import Request, generation, generation_identity, run_wave

    backend = FakeBackend()
    reqs = [Request(f"{i:024x}", "answer", [{"role": "user", "content": "x" * (i + 1)}]) for i in range(7)]
    store = JsonlStore(tmp_path / "steps.jsonl")
    plan_dir = tmp_path / "plans"
    sampling = Sampling(max_new_tokens=4)
    ident = generation_identity(backend, sampling)
    stats, fresh = run_wave(reqs, store, generation(backend, sampling), plan_dir, 3, "answers", ident, progress=False)
    assert backend.calls == [3, 3, 1] and stats.generated == 7 and len(fresh) == 7
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    # simulate a kill in the middle of the second batch: its last record never reached the disk
    (tmp_path / "steps.jsonl").write_text("\n".join(lines[:5]) + "\n")
    # and a plan left behind by that killed run
    from cai.config import stable_hash
    wave_id = stable_hash([sorted(r.key for r in reqs), 3, ident])
    (plan_dir / f"answers-{wave_id}.json").write_text(json.dumps([[r.key for r in reqs[i:i + 3]] for i in (0, 3, 6)]))
    backend.calls.clear()
    store = JsonlStore(tmp_path / "steps.jsonl")
    sampling = Sampling(max_new_tokens=4)
    ident = generation_identity(backend, sampling)
    stats, fresh = run_wave(reqs, store, generation(backend, sampling), plan_dir, 3, "answers", ident, progress=False)
    assert backend.calls == [3, 1]  # the torn batch replayed whole, then the untouched last batch
    assert stats.generated == 2 and stats.reused == 5
    again = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert without_timing(again) == without_timing([json.loads(x) for x in lines])  # same records, same order
    assert not list(plan_dir.glob("*.json"))
    # killed after the last batch was stored but before the plan was removed: the next run removes it
    (plan_dir / f"answers-{wave_id}.json").write_text("[]")
    stats, _ = run_wave(reqs, store, generation(backend, sampling), plan_dir, 3, "answers", ident, progress=False)
    assert stats.generated == 0 and not list(plan_dir.glob("*.json"))


def test_sft_data_all_rounds_and_no_few_shot(tmp_path, constitution):
    main(sl_args(tmp_path, constitution, **{"sft.data": "all", "critique.few_shot": 0, "red_team.limit": 3}))
    import datasets

    sft = datasets.load_dataset("json", data_files=str(tmp_path / "runs" / "r" / "sl" / "sft.jsonl"), split="train")
    chains = read_jsonl(tmp_path / "runs" / "r" / "sl" / "chains.jsonl")
    revisions = [r for c in chains for r in c["rounds"] if r["revision"].strip()]
    # one example per non-empty revision round, plus helpful answers at ratio 0.5 of 3 prompts x 2 rounds
    assert sft["source"].count("revision") == len(revisions)
    assert sft["source"].count("helpful") == 3
    assert sorted(set(sft["round"])) == [0, 1, 2]


@pytest.mark.parametrize("override", ["sampling.top_p=0", "sampling.temperature=-1", "red_team.limit=-1",
                                      "critique.few_shot=-1", "critique.rounds=-1"])
def test_bad_sl_settings_exit_2_before_any_work(tmp_path, constitution, override, capsys):
    with pytest.raises(SystemExit) as e:
        main(sl_args(tmp_path, constitution) + [override])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_runs_from_another_directory_with_bundled_files(tmp_path, monkeypatch):
    """Bundled constitution/prompt/template paths resolve against the project from any working directory."""
    monkeypatch.chdir(tmp_path)
    main(["stage=sl", "run=elsewhere", "generator.model=tiny", "red_team.limit=1", "critique.rounds=0",
          "sampling.max_new_tokens=4", "train=false", "progress=false"])
    run = tmp_path / "runs" / "elsewhere"
    assert (run / "constitution.yaml").read_bytes() == (ROOT / "constitutions" / "default.yaml").read_bytes()
    assert len(read_jsonl(run / "sl" / "chains.jsonl")) == 1


def test_human_demonstrations_as_sft_data(tmp_path, constitution):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"question {i}", "answer": f"a careful answer {i}",
                                         "annotator": "ann-1"}) + "\n" for i in range(4)))
    main(sl_args(tmp_path, constitution, run="h", source="human", human_demonstrations=demos, train=True,
                 **{"sft.batch_size": 4}))
    sft = read_jsonl(tmp_path / "runs" / "h" / "sl" / "sft.jsonl")
    assert [e["source"] for e in sft] == ["human"] * 4 and summary(tmp_path, "h")["generated"] == 0
    assert "4 human demonstrations" in (tmp_path / "runs" / "h" / "sl" / "model" / "README.md").read_text()
    main(sl_args(tmp_path, constitution, run="b", source="both", human_demonstrations=demos))
    sources = [e["source"] for e in read_jsonl(tmp_path / "runs" / "b" / "sl" / "sft.jsonl")]
    assert sources.count("human") == 4 and sources.count("revision") > 0 and sources.count("helpful") == 3


def test_sharded_generation_merges_exactly(tmp_path, constitution):
    """shard=i/n processes generate disjoint parts; a run without shard= merges them and generates nothing."""
    for i in range(3):
        main(sl_args(tmp_path, constitution, shard=f"{i}/3"))
    shards = [json.loads((tmp_path / "runs" / "r" / "sl" / "shards" / f"{i}-of-3" / "summary.json").read_text())
              for i in range(3)]
    assert sum(s["prompts"] for s in shards) == 6 and sum(s["helpful"] for s in shards) == 3
    main(sl_args(tmp_path, constitution))
    s = summary(tmp_path)
    assert s["generated"] == 0 and s["chains_reused"] == 6  # every text came from the shards
    steps = read_jsonl(tmp_path / "runs" / "r" / "sl" / "steps.jsonl")
    assert len(steps) == len({r["key"] for r in steps}) == 6 + 3 + 6 * 2 * ROUNDS
    main(sl_args(tmp_path, constitution))  # merging again adds nothing
    assert len(read_jsonl(tmp_path / "runs" / "r" / "sl" / "steps.jsonl")) == len(steps)
    with pytest.raises(SystemExit):
        main(sl_args(tmp_path, constitution, shard="3/3"))


def test_checkpoint_with_a_torn_trainer_state_is_skipped(tmp_path):
    """A kill while the Trainer writes trainer_state.json leaves it empty: resume from the previous checkpoint."""
    from cai.train.common import last_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path).name == "checkpoint-2"
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2')  # cut short
    assert last_checkpoint(tmp_path) is None
