"""JsonlStore (append, reopen, torn tails, corruption), write_atomic, RunLock, Metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import cai.store
from cai.errors import CaiError
from cai.io import read_jsonl, write_atomic, write_jsonl_atomic
from cai.paths import PROJECT_ROOT
from cai.runs import RunLock
from cai.store import JsonlStore, Metrics


def recs(*keys):
    return [{"key": k, "text": f"t-{k}"} for k in keys]


def test_append_then_reopen_gives_same_records(tmp_path):
    path = tmp_path / "sub" / "steps.jsonl"
    s = JsonlStore(path)
    assert len(s) == 0 and not path.exists()
    s.append(recs("a", "b"))
    s.append(recs("c"))
    again = JsonlStore(path)
    assert again.records == s.records == {r["key"]: r for r in recs("a", "b", "c")}
    assert "b" in again and again["b"]["text"] == "t-b" and again.get("zz") is None
    assert path.read_text().count("\n") == 3


def test_appending_an_existing_key_does_nothing(tmp_path):
    path = tmp_path / "s.jsonl"
    s = JsonlStore(path)
    s.append(recs("a"))
    before = path.read_bytes()
    s.append([{"key": "a", "text": "different"}])
    assert path.read_bytes() == before
    assert s["a"]["text"] == "t-a"
    s.append([{"key": "a", "text": "x"}, {"key": "b", "text": "t-b"}])  # only the new one is written
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b"]
    JsonlStore(path).append(recs("a", "b"))  # a reopened store knows the keys too
    assert len(path.read_text().splitlines()) == 2


def test_torn_last_line_is_ignored_then_cut_at_next_append(tmp_path):
    path = tmp_path / "s.jsonl"
    JsonlStore(path).append(recs("a", "b"))
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "te')  # a killed writer
    s = JsonlStore(path)
    assert set(s.records) == {"a", "b"}
    s.append(recs("d"))
    data = path.read_bytes()
    assert data == good + (json.dumps(recs("d")[0]) + "\n").encode()
    assert [r["key"] for r in read_jsonl(path)] == ["a", "b", "d"]
    assert set(JsonlStore(path).records) == {"a", "b", "d"}


def test_torn_tail_that_is_valid_json_without_newline_is_still_cut(tmp_path):
    path = tmp_path / "s.jsonl"
    JsonlStore(path).append(recs("a"))
    with open(path, "ab") as f:
        f.write(json.dumps(recs("b")[0]).encode())  # complete object, but the newline never made it
    s = JsonlStore(path)
    assert set(s.records) == {"a"}
    s.append(recs("c"))
    assert [r["key"] for r in read_jsonl(path)] == ["a", "c"]


@pytest.mark.parametrize("bad", [b"not json", b"[1, 2]", b'{"no_key": 1}'])
def test_corrupt_middle_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(r).encode() for r in recs("a", "b")]
    path.write_bytes(lines[0] + b"\n" + bad + b"\n" + lines[1] + b"\n")
    with pytest.raises(CaiError) as e:
        JsonlStore(path)
    assert str(e.value).startswith(f"{path}:2: corrupt record")


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "d" / "f.txt"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_write_atomic_failure_keeps_old_content_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    write_atomic(path, "old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(cai.store.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_write_jsonl_atomic_roundtrip(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl_atomic(path, [{"key": "a", "t": "é"}, {"key": "b"}])
    assert read_jsonl(path) == [{"key": "a", "t": "é"}, {"key": "b"}]
    assert "é" in path.read_text(encoding="utf-8")


def test_read_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(CaiError, match=r"x\.jsonl:3: invalid JSON"):
        read_jsonl(path)


def test_runlock_second_lock_in_same_process_fails_with_pid(tmp_path):
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
        with pytest.raises(CaiError) as e:
            with RunLock(tmp_path / "run"):
                pass
        assert f"in use by pid {os.getpid()}" in str(e.value)
    with RunLock(tmp_path / "run"):  # released on exit
        pass


LOCK_AND_SLEEP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cai.runs import RunLock
    lock = RunLock(Path(sys.argv[1])).__enter__()
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(run_dir):
    p = subprocess.Popen([sys.executable, "-c", LOCK_AND_SLEEP, str(run_dir)], cwd=PROJECT_ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_runlock_held_by_subprocess_names_its_pid(tmp_path):
    p = _holder(tmp_path / "run")
    try:
        with pytest.raises(CaiError, match=f"run is in use by pid {p.pid};"):
            with RunLock(tmp_path / "run"):
                pass
    finally:
        p.kill()
        p.wait()


def test_runlock_released_when_holder_is_sigkilled(tmp_path):
    p = _holder(tmp_path / "run")
    try:
        with pytest.raises(CaiError):
            RunLock(tmp_path / "run").__enter__()
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())


def test_metrics_log_namespaces_keys(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    m = Metrics(path, "sl")
    before = time.time()
    m.log({"loss": 1.5, "sl/generate/tokens": 7, "other/x": 2}, step=3)
    m.log({"loss": 1.0})
    rows = read_jsonl(path)
    assert len(rows) == 2
    first = rows[0]
    assert {k: v for k, v in first.items() if k != "time"} == {
        "stage": "sl", "step": 3, "sl/loss": 1.5, "sl/generate/tokens": 7, "other/x": 2}
    assert before - 1 <= first["time"] <= time.time() + 1
    assert rows[1]["step"] is None and rows[1]["sl/loss"] == 1.0


def test_a_second_writer_is_refused_not_cut_back(tmp_path):
    """Two store objects on one file: the second's append used to truncate the file to its own idea of the end,
    deleting the first's records. Now it refuses with one line and the file keeps every record."""
    path = tmp_path / "s.jsonl"
    JsonlStore(path).append(recs("a"))
    first, second = JsonlStore(path), JsonlStore(path)
    first.append(recs("b"))
    before = path.read_bytes()
    with pytest.raises(CaiError) as e:
        second.append(recs("c"))
    assert str(e.value).startswith(f"{path}: changed by another writer") and "\n" not in str(e.value)
    assert path.read_bytes() == before
    assert [r["key"] for r in read_jsonl(path)] == ["a", "b"]
    # a torn tail under another writer's complete record is not "torn": also refused, nothing cut
    with open(path, "ab") as f:
        f.write(b'{"key": "t')
    third = JsonlStore(path)
    with open(path, "ab") as f:
        f.write(b'orn"}\n')
    torn_then_completed = path.read_bytes()
    with pytest.raises(CaiError, match="changed by another writer"):
        third.append(recs("d"))
    assert path.read_bytes() == torn_then_completed
