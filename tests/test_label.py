"""The labeling page (`python -m cai.label`): event replay and undo, pairs files, the HTTP API's refusals, the
hooks into stage=rl/sl, export, and the real page driven by keyboard in headless Chromium (label, undo, skip,
a better answer, stop, resume, a second annotator)."""

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cai.config import load_config, stable_hash
from cai.errors import CaiError
from cai.human import combine_human, load_demonstrations, load_human_comparisons
from cai.label import (
    LabelSession,
    RequestError,
    export_demonstrations,
    export_labels,
    is_swapped,
    labels_path,
    load_gold,
    load_pairs,
    main,
    page_comparisons,
    page_demonstrations,
    pair_id,
    start_server,
)
from cai.pipeline import main as pipeline_main
from cai.records import human_comparison, pair_identity
from cai.runs import RunLock
from tests.conftest import raw_exchange as conftest_raw_exchange

from .conftest import ROOT
from .test_human import SHAPE

CHROMIUM = "/usr/bin/chromium"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_rows(n=4):
    return [{"prompt": f"Prompt {i}: how do I do thing {i}?", "answer_a": f"A useful answer about thing {i}.",
             "answer_b": f"An unhelpful reply {i}.", "category": "helpful" if i % 2 else "red-team",
             **({"prompt_id": f"p-{i}"} if i != 1 else {})} for i in range(n)]


def session(tmp_path, run_dir=None):
    run_dir = run_dir or tmp_path / "run"
    pairs, _ = load_pairs(run_dir, str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows())))
    return LabelSession(pairs, run_dir), pairs


def annotator_with(swapped: bool, pid: str) -> str:
    return next(f"ann-{i}" for i in range(100) if is_swapped(0, f"ann-{i}", pid) == swapped)


# --- events, undo, replay -----------------------------------------------------------------------------------


def test_undo_cancels_latest_events_and_replay_restores_state(tmp_path):
    s, pairs = session(tmp_path)
    p0, p1, p2, p3 = (p["id"] for p in pairs)
    assert s.state("ann")["pair"]["id"] == p0
    done = [s.label("ann", p0, "a")["event"], s.skip("ann", p1)["event"],
            s.demonstrate("ann", p2, "a better answer")["event"]]
    st = s.label("ann", p2, "tie")
    done.append(st["event"])
    assert st["pair"]["id"] == p3 and st["mine"] == {"labeled": 2, "skipped": 1, "total": 4, "demonstrations": 1,
                                                "remaining": 1, "gold_labeled": 0, "gold_accuracy": None}
    assert len(set(done)) == 4
    # undo walks back one event at a time (label, then the demonstration); undo is never itself undone
    assert s.undo("ann", done.pop())["pair"]["id"] == p2
    st = s.undo("ann", done.pop())
    assert st["pair"]["id"] == p2 and st["mine"]["demonstrations"] == 0 and st["message"] == "undid the demonstration"
    assert s.undo("ann", done.pop())["pair"]["id"] == p1  # the skip
    with pytest.raises(RequestError, match="already labeled"):
        s.label("ann", p0, "b")
    done.append(s.label("ann", p1, "b")["event"])
    # a fresh session (a restarted server) replays the file to the same state; keys are unique per event
    again = LabelSession(pairs, tmp_path / "run")
    assert again.state("ann") == s.state("ann")
    assert again.active == s.active
    events = [json.loads(x) for x in labels_path(tmp_path / "run").read_text().splitlines()]
    assert [e["event"] for e in events] == ["label", "skip", "demonstration", "label", "undo", "undo", "undo", "label"]
    assert len({e["key"] for e in events}) == 8
    assert [(c["prompt"], c["soft_label"]) for c in page_comparisons(tmp_path / "run")] == [
        (pairs[0]["prompt"], 1.0 if not events[0]["swapped"] else 0.0),
        (pairs[1]["prompt"], 0.0 if not events[7]["swapped"] else 1.0)]
    assert page_demonstrations(tmp_path / "run") == []
    again.undo("ann", done.pop())
    again.undo("ann", done.pop())
    with pytest.raises(RequestError, match="nothing to undo") as e:
        again.undo("ann", events[0]["key"])
    assert e.value.status == 409


def test_a_hand_edited_undo_is_an_error(tmp_path):
    s, pairs = session(tmp_path)
    s.label("ann", pairs[0]["id"], "a")
    s.undo("ann", s.label("ann", pairs[1]["id"], "a")["event"])
    path = labels_path(tmp_path / "run")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")  # the undo no longer follows its label
    with pytest.raises(CaiError, match=r"labels.jsonl: event .*: undoes .*not ann's latest"):
        page_comparisons(tmp_path / "run")


def test_screen_order_is_mapped_back_and_exports_reimport(tmp_path):
    s, pairs = session(tmp_path)
    p0, p1 = pairs[0]["id"], pairs[1]["id"]
    straight, swapped = annotator_with(False, p0), annotator_with(True, p0)
    st = s.state(swapped)["pair"]
    assert (st["left"], st["right"]) == (pairs[0]["answer_b"], pairs[0]["answer_a"])
    s.label(straight, p0, "a")  # left = answer_a better
    s.label(swapped, p0, "a")  # left = answer_b better
    s.label(straight, p1, "tie")
    s.demonstrate(swapped, p1, "Here is how, step by step.")
    s.demonstrate(swapped, p1, "Here is how, step by step.")  # the same text twice is one SFT record
    comps = page_comparisons(tmp_path / "run")
    assert [(c["annotator"], c["soft_label"]) for c in comps] == [(straight, 1.0), (swapped, 0.0), (straight, 0.5)]
    assert all(set(c) == SHAPE and c["source"] == "human" for c in comps)
    assert (comps[0]["prompt_id"], comps[0]["category"]) == ("p-0", "red-team")
    assert (comps[2]["answer_a"], comps[2]["answer_b"]) == (pairs[1]["answer_a"], pairs[1]["answer_b"])
    demos = page_demonstrations(tmp_path / "run")
    assert demos == load_demonstrations(write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": pairs[1]["prompt"], "answer": "Here is how, step by step.", "annotator": swapped,
         "prompt_id": pairs[1]["prompt_id"]}]))
    # export -> cai.human's importers give the very same records (keys included)
    assert export_labels(tmp_path / "run", str(tmp_path / "labels.jsonl"))[0] == 3
    assert load_human_comparisons(tmp_path / "labels.jsonl") == comps
    assert export_demonstrations(tmp_path / "run", str(tmp_path / "demos.jsonl")) == 1
    assert load_demonstrations(tmp_path / "demos.jsonl") == demos


def test_pair_id_matches_feedback_pair_identity():
    a = {"prompt": "q", "answer_a": "x", "answer_b": "y"}
    b = {"prompt": "q", "answer_a": "y", "answer_b": "x"}
    c = {"prompt": "q", "answer_a": "x", "answer_b": "z"}
    assert pair_identity(a) == pair_identity(b) and pair_id("q", "x", "y") == pair_id("q", "y", "x")
    assert pair_identity(a) != pair_identity(c) and pair_id("q", "x", "y") != pair_id("q", "x", "z")


# --- pairs ------------------------------------------------------------------------------------------------------


def test_pairs_from_the_runs_comparisons(tmp_path):
    run = tmp_path / "run"
    rows = [{"prompt": f"q{i}", "answer_a": f"x{i}", "answer_b": f"y{i}", "soft_label": 0.6, "key": "k"}
            for i in range(4)]
    write_jsonl(run / "rl/round-1/comparisons.jsonl", [rows[0], rows[1]])
    write_jsonl(run / "rl/round-10/comparisons.jsonl", [rows[3]])
    write_jsonl(run / "rl/round-2/comparisons.jsonl", [
        {**rows[0], "answer_a": "y0", "answer_b": "x0"},  # round 1's pair again, in the other order
        {**rows[2], "answer_b": "x2"},  # identical answers: nothing to choose
        {**rows[2], "answer_b": ""},  # an empty answer
        rows[2]])
    pairs, left_out = load_pairs(run)
    assert [p["prompt"] for p in pairs] == ["q0", "q1", "q2", "q3"] and left_out == 2
    assert (pairs[0]["answer_a"], pairs[0]["category"]) == ("x0", "")  # the first occurrence's order
    assert pairs[0]["prompt_id"] == "human-" + stable_hash({"prompt": "q0"}, 12)  # as cai.human names it
    with pytest.raises(CaiError, match=r"rl/round-\*/comparisons.jsonl: no pairs to label; run stage=rl first"):
        load_pairs(tmp_path / "empty")
    # a damaged answer (an unpaired surrogate) in the run's own comparisons is an error, not a pair left out
    write_jsonl(run / "rl/round-3/comparisons.jsonl", ['{"prompt": "q", "answer_a": "x", "answer_b": "\\ud800 y"}'])
    with pytest.raises(CaiError, match=r"round-3/comparisons.jsonl:1: answer_b: holds an unpaired surrogate"):
        load_pairs(run)


@pytest.mark.parametrize("rows, expected", [
    (['{"prompt": "q", "answer_a": "x", "answer_b": "y"}', "{oops"], r"pairs.jsonl:2: invalid JSON"),
    (["[1, 2]"], r"pairs.jsonl:1: expected a JSON object per line, got list"),
    ([{"prompt": "q", "answer_a": "x"}], r"pairs.jsonl:1: answer_b: expected a non-empty string"),
    ([{"prompt": " ", "answer_a": "x", "answer_b": "y"}], r"pairs.jsonl:1: prompt: expected a non-empty string"),
    (["", {"prompt": "q", "answer_a": "x", "answer_b": "x"}], r"pairs.jsonl:2: answer_b: expected a different"),
    ([{"prompt": "q", "answer_a": "x", "answer_b": "y", "prompt_id": 3}], r"pairs.jsonl:1: prompt_id: expected a str"),
    ([""], r"pairs.jsonl: no pairs to label; run stage=rl first, or give pairs=FILE"),
    (['{"prompt": "q", "answer_a": "x", "answer_b": "y"}', '{"prompt": "q", "answer_a": "x\\ud800", "answer_b": "y"}'],
     r"pairs.jsonl:2: answer_a: holds an unpaired surrogate"),
    (['{"prompt": "q\\udfff", "answer_a": "x", "answer_b": "y"}'], r"pairs.jsonl:1: prompt: holds an unpaired surrogate"),
    (['{"prompt": "q", "answer_a": "x", "answer_b": "y", "category": "\\ud83d"}'],
     r"pairs.jsonl:1: category: holds an unpaired surrogate"),
])
def test_bad_pairs_files(tmp_path, rows, expected):
    with pytest.raises(CaiError, match=expected):
        load_pairs(tmp_path / "run", str(write_jsonl(tmp_path / "pairs.jsonl", rows)))


def test_cli_refusals(tmp_path):
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(2)))
    base = ["run=r", f"runs_dir={tmp_path}", f"pairs={pairs}"]
    with pytest.raises(CaiError, match="host"):
        main.__wrapped__(base + ["host=0.0.0.0"])  # no such setting: the page stays on 127.0.0.1
    with pytest.raises(CaiError, match=r"port=70000: expected 0"):
        main.__wrapped__(base + ["port=70000"])
    with pytest.raises(CaiError, match=r"run: expected run=NAME"):
        main.__wrapped__([f"pairs={pairs}"])
    with pytest.raises(CaiError, match=r"human/labels.jsonl: no labels yet"):
        main.__wrapped__(base + [f"export={tmp_path / 'out.jsonl'}"])
    with RunLock(tmp_path / "r" / "human"):  # a server is already writing this store
        with pytest.raises(CaiError, match=r"r/human: run is in use by pid"):
            main.__wrapped__(base)
    assert not (tmp_path / "out.jsonl").exists()


# --- the HTTP API ---------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    s, pairs = session(tmp_path)
    srv, url = start_server(s, timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield url, pairs
    srv.shutdown()
    srv.server_close()


def call(url, path, body=None, token=None, raw=None):
    base, tok = url.split("/?token=")
    req = urllib.request.Request(base + path, data=raw if raw is not None else (json.dumps(body).encode()
                                                                                if body is not None else None))
    req.add_header("X-Cai-Token", tok if token is None else token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_api_refuses_bad_requests(server):
    url, pairs = server
    base, tok = url.split("/?token=")
    with urllib.request.urlopen(url, timeout=10) as r:  # the page, with the token in the URL
        page = r.read().decode()
        assert r.status == 200 and "script-src 'unsafe-inline'" in r.headers["Content-Security-Policy"]
    assert "innerHTML" not in page and "textContent = current.left" in page
    for path in ("/", "/api/state?annotator=x", "/api/progress"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=10)
        assert e.value.code == 403
    assert call(url, "/api/state?annotator=x", token=tok[:-1] + "!")[0] == 403
    assert call(url, "/api/label", {"annotator": "x", "pair": pairs[0]["id"], "choice": "a"}, token="")[0] == 403
    assert call(url, "/nothing")[0] == 404
    assert call(url, "/api/state")[1] == {"error": "annotator: expected a non-empty name"}
    pid = pairs[0]["id"]
    for body, status, msg in [
        (b"{oops", 400, "body: expected a JSON object"),
        (b"[1]", 400, "body: expected a JSON object"),
        (b"\xff\xfe", 400, "body: expected a JSON object"),
        ({"pair": pid, "choice": "a"}, 400, "annotator: expected a non-empty name"),
        ({"annotator": "x" * 65, "pair": pid, "choice": "a"}, 400, "annotator: expected at most 64 printable"),
        ({"annotator": "x\n", "pair": pid, "choice": "a"}, 200, None),  # trimmed
        ({"annotator": "x", "pair": pid, "choice": "a"}, 409, "x already labeled this pair"),
        ({"annotator": "y", "pair": pid, "choice": "left"}, 400, "choice: expected a (left better), b (right"),
        ({"annotator": "y", "pair": "nope", "choice": "a"}, 400, "pair: no pair 'nope' on this page"),
        ({"annotator": "y", "choice": "a"}, 400, "pair: expected a pair id"),
    ]:
        code, out = call(url, "/api/label", raw=body if isinstance(body, bytes) else json.dumps(body).encode())
        assert code == status and (msg is None or out["error"].startswith(msg)), (body, code, out)
    code, out = call(url, "/api/demonstration", {"annotator": "y", "pair": pid, "answer": "z" * 20_001})
    assert (code, out["error"]) == (400, "answer: at most 20000 characters, got 20001")
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/api/label")
    conn.putheader("X-Cai-Token", tok)
    conn.putheader("Content-Length", str(10**6))
    conn.endheaders()  # the body is never sent: the server answers at once
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"] == "request body over 262144 bytes"
    code, progress = call(url, "/api/progress")
    assert code == 200 and progress["labels"] == 1 and list(progress["annotators"]) == ["x"]


def raw_exchange(url: str, data: bytes) -> tuple[int, dict]:
    """Raw bytes to the labeling server at `url`: (status, JSON)."""
    host, port = url.split("/?token=")[0].removeprefix("http://").split(":")
    return conftest_raw_exchange(host, int(port), data)


def post_raw(url: str, body: bytes, length: bytes | None = None, path: str = "/api/label", extra: bytes = b""):
    tok = url.split("/?token=")[1]
    length = str(len(body)).encode() if length is None else length
    return raw_exchange(url, f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Cai-Token: {tok}\r\n".encode() + extra +
                        b"Content-Length: " + length + b"\r\n\r\n" + body)


def test_bad_lengths_unicode_and_json_get_a_json_400(server):
    url, pairs = server
    pid = pairs[0]["id"]
    good = json.dumps({"annotator": "zed", "pair": pid, "choice": "a"}).encode()
    # non-ASCII digits ("²" is a digit to str.isdigit, and int() reads "١٢"), signs, blanks, two headers
    for length in (b"\xb2", "²".encode(), "١٢".encode(), b"-1", b"+5", b"1e3", b"", b"12 34"):
        code, out = post_raw(url, good, length)
        assert (code, out["error"]) == (400, "expected one Content-Length header (a number of bytes, ASCII digits)")
    code, out = post_raw(url, good, extra=f"Content-Length: {len(good)}\r\n".encode())
    assert code == 400 and out["error"].startswith("expected one Content-Length")
    code, out = post_raw(url, good, extra=b"Transfer-Encoding: chunked\r\n")
    assert code == 411
    for body, msg in [
        (b'{"annotator": "\\ud800", "pair": "%s", "choice": "a"}' % pid.encode(), "annotator: holds an unpaired surrogate"),
        (b'{"annotator": "ann\\udc00x", "pair": "%s", "choice": "a"}' % pid.encode(), "annotator: holds an unpaired"),
        (b'{"annotator": "zed", "pair": "%s", "answer": "better \\ud800"}' % pid.encode(),
         "body: a string holds an unpaired surrogate"),
        (b'{"annotator": "zed", "annotator": "eve", "pair": "%s", "choice": "a"}' % pid.encode(),
         "body: expected a JSON object"),  # duplicate keys: which one counts is ambiguous
        (b"[" * 100_000, "body: expected a JSON object"),  # nested too deeply
    ]:
        for path in ("/api/label", "/api/demonstration"):
            code, out = post_raw(url, body, path=path)
            assert code == 400 and out["error"].startswith(msg), (body[:60], path, out)
    # undo names the action it cancels
    code, out = post_raw(url, b'{"annotator": "zed"}', path="/api/undo")
    assert (code, out["error"]) == (400, 'undoes: expected the id ("event") of the action to undo')
    assert raw_exchange(url, b"GET /api/state x HTTP/1.1\r\n\r\n")[0] == 400  # http.server's own refusals are JSON too
    assert raw_exchange(url, b"PUT /api/label HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 501
    code, out = post_raw(url, good)  # and the server still labels
    assert code == 200 and out["mine"]["labeled"] == 1 and isinstance(out["event"], str)


def test_a_slow_client_loses_its_connection(server):
    """A browser that stalls mid-request (in the headers, or in the body) is cut off after the socket timeout
    (1 s here; `timeout=` setting), so it cannot hold a server thread."""
    url, _ = server
    host, port = url.split("/?token=")[0].removeprefix("http://").split(":")
    tok = url.split("/?token=")[1]
    for partial in (b"POST /api/label HTTP/1.1\r\nHost: x\r\n",
                    f"POST /api/label HTTP/1.1\r\nX-Cai-Token: {tok}\r\nContent-Length: 90\r\n\r\n{{\"ann".encode()):
        with socket.create_connection((host, int(port)), timeout=8) as s:
            s.sendall(partial)
            start = time.time()
            assert s.recv(65536) == b""  # closed by the server; a socket.timeout here means it still waits
            assert time.time() - start < 6
    assert call(url, "/api/progress")[0] == 200


def test_undo_only_cancels_the_clients_own_last_action(server):
    """Two tabs of one annotator (and another annotator): an undo names the action it cancels and is refused
    when that is no longer the annotator's latest, so one tab never cancels what another did."""
    url, pairs = server
    p0, p1 = pairs[0]["id"], pairs[1]["id"]
    code, tab1 = call(url, "/api/label", {"annotator": "alice", "pair": p0, "choice": "a"})
    assert code == 200
    code, tab2 = call(url, "/api/label", {"annotator": "alice", "pair": p1, "choice": "b"})
    assert code == 200
    code, bob = call(url, "/api/label", {"annotator": "bob", "pair": p0, "choice": "tie"})
    assert code == 200
    # tab 1 undoes "its last action": refused, tab 2's label stays
    code, out = call(url, "/api/undo", {"annotator": "alice", "undoes": tab1["event"]})
    assert (code, out["error"]) == (409, "nothing undone: alice acted since (in another tab or window?); only the "
                                         "latest action can be undone")
    # another annotator's action id cancels nothing of alice's, nor of bob's
    assert call(url, "/api/undo", {"annotator": "alice", "undoes": bob["event"]})[0] == 409
    assert call(url, "/api/undo", {"annotator": "bob", "undoes": tab2["event"]})[0] == 409
    assert call(url, "/api/progress")[1]["labels"] == 3
    # each tab undoes its own, latest first
    code, out = call(url, "/api/undo", {"annotator": "alice", "undoes": tab2["event"]})
    assert code == 200 and out["undid"] == tab2["event"] and out["mine"]["labeled"] == 1
    code, out = call(url, "/api/undo", {"annotator": "alice", "undoes": tab1["event"]})
    assert code == 200 and out["mine"]["labeled"] == 0
    assert call(url, "/api/undo", {"annotator": "alice", "undoes": tab1["event"]})[0] == 409  # not twice
    assert call(url, "/api/progress")[1]["annotators"]["bob"]["labeled"] == 1


def test_export_never_writes_over_the_servers_files(tmp_path):
    run = tmp_path / "r"
    s, pairs = session(tmp_path, run)
    s.label("ann", pairs[0]["id"], "a")
    s.demonstrate("ann", pairs[0]["id"], "A better answer.")
    log = labels_path(run)
    before = log.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(log)
    base = ["run=r", f"runs_dir={tmp_path}"]
    for setting, target in [("export", log), ("export", log.parent / ".lock"), ("export", log.parent / "new.jsonl"),
                            ("export_demonstrations", log), ("export", tmp_path / "link.jsonl"),
                            ("export", tmp_path / "r" / "x" / ".." / "human" / "labels.jsonl")]:
        with pytest.raises(CaiError, match=rf"{setting}=.*: is inside .*r/human, which the labeling server owns"):
            main.__wrapped__(base + [f"{setting}={target}", f"export_demonstrations={tmp_path / 'd.jsonl'}"
                                     if setting == "export" else f"export={tmp_path / 'l.jsonl'}"])
        with pytest.raises(CaiError, match="which the labeling server owns"):
            (export_labels if setting == "export" else export_demonstrations)(run, str(target))
    with pytest.raises(CaiError, match=r"export_demonstrations=.*same file as export="):
        main.__wrapped__(base + [f"export={tmp_path / 'o.jsonl'}", f"export_demonstrations={tmp_path / 'o.jsonl'}"])
    assert log.read_bytes() == before and not (log.parent / "new.jsonl").exists()
    assert not any((tmp_path / n).exists() for n in ("l.jsonl", "d.jsonl", "o.jsonl"))
    # the store still replays, and an export elsewhere works
    assert LabelSession(pairs, run).state("ann")["mine"]["labeled"] == 1
    assert main.__wrapped__(base + [f"export={tmp_path / 'l.jsonl'}"]) == 0
    assert load_human_comparisons(tmp_path / "l.jsonl") == page_comparisons(run)


# --- the hooks: stage=rl and stage=sl read the page's labels ------------------------------------------------------


def test_rl_and_sl_read_the_page(tmp_path):
    from cai.stages.pairs import human_comparisons as _human_comparisons  # heavy (imports torch)

    runs = tmp_path / "runs"
    rl = lambda *o: load_config(["stage=rl", "run=r", f"runs_dir={runs}", "feedback.source=human", *o])  # noqa: E731
    with pytest.raises(CaiError, match=r"feedback.source=human needs human labels: .*python -m cai.label run=r"):
        _human_comparisons(rl())
    sl = ["stage=sl", "run=r", f"runs_dir={runs}", "source=human", "generator.model=tiny", "train=false",
          "progress=false"]
    with pytest.raises(SystemExit):
        pipeline_main(sl)
    s, pairs = session(tmp_path, runs / "r")
    s.label("ann", pairs[0]["id"], "b")
    s.demonstrate("ann", pairs[0]["id"], "A much better answer.")
    page = page_comparisons(runs / "r")
    assert _human_comparisons(rl()) == page and len(page) == 1
    # the same labels exported and imported as a file count once
    export_labels(runs / "r", str(tmp_path / "exported.jsonl"))
    assert _human_comparisons(rl(f"feedback.human_labels={tmp_path / 'exported.jsonl'}")) == page
    assert _human_comparisons(rl("feedback.source=ai")) == page  # source=ai: for agreement with AI labels
    pipeline_main(sl)
    sft = [json.loads(x) for x in (runs / "r" / "sl" / "sft.jsonl").read_text().splitlines()]
    assert sft == page_demonstrations(runs / "r") and sft[0]["completion"][0]["content"] == "A much better answer."


# --- the real page in headless Chromium ----------------------------------------------------------------------------


class Server:
    """`python -m cai.label` in a subprocess; `url` is the printed labeling URL."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cai.label", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.output, deadline = "", time.time() + 30
        while "labeling page: " not in self.output or not self.output.endswith("\n"):
            assert self.proc.poll() is None and time.time() < deadline, self.output
            if select.select([self.proc.stdout], [], [], 1)[0]:  # raw reads: no buffer hides a line from select
                self.output += os.read(self.proc.stdout.fileno(), 65536).decode()
        self.url = self.output.split("labeling page: ")[1].split()[0]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)  # what Ctrl+C does: the server prints its summary and exits
        out = self.proc.communicate(timeout=60)[0].decode()  # generous: a loaded CI machine is slow to exit
        assert self.proc.returncode == 0, self.output + out
        return out


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing; CI installs it with `make browser`")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; `make browser`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("playwright is missing: pip install -e .[dev]")
        pytest.skip("playwright is missing: pip install -e .[dev]")
    with sync_playwright() as p:
        # launch() gives every browser a fresh temporary profile (user data dir)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def test_labeling_page_in_headless_chromium(tmp_path, chromium):
    from playwright.sync_api import expect

    rows = pair_rows(4)
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = ["run=web", f"runs_dir={tmp_path}", f"pairs={pairs_file}", "port=0"]
    ids = [pair_id(r["prompt"], r["answer_a"], r["answer_b"]) for r in rows]
    # the data are chosen so that alice sees some pairs swapped and some not: the mapping back is tested
    assert {is_swapped(0, "alice", i) for i in ids[:2]} == {True, False}
    srv = Server(*args)
    page = chromium.new_page()
    page.set_default_timeout(10_000)
    prompt, left, right, progress = (page.locator(s) for s in ("#prompt", "#left", "#right", "#progress"))
    seen = {}  # prompt index -> (left text, right text) as alice saw them

    def at(i):
        expect(prompt).to_have_text(rows[i]["prompt"])
        seen[i] = (left.text_content(), right.text_content())
        assert set(seen[i]) == {rows[i]["answer_a"], rows[i]["answer_b"]}

    page.goto(srv.url + "&annotator=alice")
    at(0)
    expect(progress).to_contain_text("0 / 4 labeled, 0 skipped")
    page.keyboard.press("1")  # left is better
    at(1)
    page.keyboard.press("ArrowRight")  # right is better ...
    at(2)
    page.keyboard.press("u")  # ... undone
    at(1)
    expect(page.locator("#message")).to_have_text("undid the label")
    page.keyboard.press("t")  # a tie instead
    at(2)
    page.keyboard.press("s")  # skip
    at(3)
    page.keyboard.press("2")
    expect(page.locator("#done")).to_be_visible()
    page.keyboard.press("Backspace")  # undo again
    expect(page.locator("#done")).to_be_hidden()  # the undo has landed: pair 3's text was on the page all along
    at(3)
    page.keyboard.press("d")
    expect(page.locator("#demo-text")).to_be_focused()
    page.keyboard.type("Step 1: read the manual. Step 2: do thing 3.")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#message")).to_have_text("better answer saved")
    expect(page.locator("#demo")).to_be_hidden()
    expect(progress).to_contain_text("2 / 4 labeled, 1 skipped, 1 better answers")
    expect(progress).to_contain_text("everyone: 2 / 4 pairs labeled by 1 annotator")
    assert status_of(srv.url.replace("token=", "token=x")) == 403
    assert "alice" in srv.stop()

    # restart: a new token (the old one is refused); alice goes on where she stopped
    old_url, srv = srv.url, Server(*args)
    assert status_of(srv.url.split("?")[0] + "?" + old_url.split("?")[1]) == 403
    page.goto(srv.url + "&annotator=alice")
    at(3)
    expect(progress).to_contain_text("2 / 4 labeled, 1 skipped, 1 better answers")
    # a second annotator, typed into the name field, has a queue of their own
    page.fill("#annotator", "bob")
    page.press("#annotator", "Enter")
    expect(prompt).to_have_text(rows[0]["prompt"])
    expect(progress).to_contain_text("0 / 4 labeled, 0 skipped")
    bob_left = left.text_content()
    page.keyboard.press("2")
    expect(prompt).to_have_text(rows[1]["prompt"])
    expect(progress).to_contain_text("everyone: 2 / 4 pairs labeled by 2 annotators")
    page.goto(srv.url)  # the name is remembered
    expect(page.locator("#annotator")).to_have_value("bob")
    expect(prompt).to_have_text(rows[1]["prompt"])
    summary = srv.stop()
    assert "alice" in summary and "bob" in summary and "2 of 4 pairs labeled" in summary
    page.close()

    run = tmp_path / "web"
    got = [(c["annotator"], c["prompt"], c["soft_label"]) for c in page_comparisons(run)]
    # "1" = left better: P(answer_a better) is 1 where alice saw answer_a on the left; bob pressed "2"
    assert got == [("alice", rows[0]["prompt"], float(seen[0][0] == rows[0]["answer_a"])),
                   ("alice", rows[1]["prompt"], 0.5), ("bob", rows[0]["prompt"], float(bob_left != rows[0]["answer_a"]))]
    assert [seen[i][0] == rows[i]["answer_b"] for i in range(4)] == [is_swapped(0, "alice", i) for i in ids]
    events = [json.loads(x) for x in labels_path(run).read_text().splitlines()]
    assert [(e["event"], e.get("choice")) for e in events if e["annotator"] == "alice"] == [
        ("label", "a"), ("label", "b"), ("undo", None), ("label", "tie"), ("skip", None), ("label", "b"),
        ("undo", None), ("demonstration", None)]
    assert all(e["swapped"] == is_swapped(0, e["annotator"], e["pair"]) for e in events if "swapped" in e)
    assert [(d["annotator"], d["prompt"][0]["content"], d["completion"][0]["content"])
            for d in page_demonstrations(run)] == [
        ("alice", rows[3]["prompt"], "Step 1: read the manual. Step 2: do thing 3.")]
    main(["run=web", f"runs_dir={tmp_path}", f"export={tmp_path / 'l.jsonl'}",
          f"export_demonstrations={tmp_path / 'd.jsonl'}"])
    assert load_human_comparisons(tmp_path / "l.jsonl") == page_comparisons(run)
    assert load_demonstrations(tmp_path / "d.jsonl") == page_demonstrations(run)


def test_two_tabs_undo_only_their_own_actions_in_chromium(server, chromium):
    """Two tabs of one annotator in headless Chromium: undo in one tab never cancels the other tab's action."""
    from playwright.sync_api import expect

    url, pairs = server
    tab1, tab2 = chromium.new_page(), chromium.new_page()
    for tab in (tab1, tab2):
        tab.set_default_timeout(10_000)
    tab1.goto(url + "&annotator=alice")
    expect(tab1.locator("#prompt")).to_have_text(pairs[0]["prompt"])
    expect(tab1.locator("#undo")).to_be_disabled()
    tab1.keyboard.press("1")
    expect(tab1.locator("#prompt")).to_have_text(pairs[1]["prompt"])
    expect(tab1.locator("#undo")).to_be_enabled()
    tab2.goto(url + "&annotator=alice")
    expect(tab2.locator("#prompt")).to_have_text(pairs[1]["prompt"])
    expect(tab2.locator("#undo")).to_be_disabled()  # alice has an action, but not from this tab
    tab2.keyboard.press("u")
    expect(tab2.locator("#message")).to_have_text("nothing to undo on this page")
    tab2.keyboard.press("2")
    expect(tab2.locator("#prompt")).to_have_text(pairs[2]["prompt"])
    tab1.keyboard.press("u")  # tab 1's own label is no longer alice's latest: nothing is undone
    expect(tab1.locator("#message")).to_contain_text("nothing undone: alice acted since")
    expect(tab1.locator("#prompt")).to_have_text(pairs[2]["prompt"])  # the real state, shown after the refusal
    assert call(url, "/api/progress")[1]["labels"] == 2
    tab2.keyboard.press("u")
    expect(tab2.locator("#message")).to_have_text("undid the label")
    expect(tab2.locator("#prompt")).to_have_text(pairs[1]["prompt"])
    tab1.keyboard.press("u")
    expect(tab1.locator("#message")).to_have_text("undid the label")
    expect(tab1.locator("#prompt")).to_have_text(pairs[0]["prompt"])
    assert call(url, "/api/progress")[1]["labels"] == 0
    tab1.close()
    tab2.close()


# --- overlap, gold pairs, several people on a pair ---------------------------------------------------------


def gold_rows(n=2):
    return [json.loads(x) for x in (ROOT / "prompts/sets/labeled_pairs.jsonl").read_text().splitlines()[:n]]


def test_overlap_gold_and_combined_export(tmp_path):
    run_dir = tmp_path / "run"
    pairs, _ = load_pairs(run_dir, str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))))
    gold = load_gold(str(write_jsonl(tmp_path / "gold.jsonl", gold_rows(2))), pairs)
    s = LabelSession(pairs, run_dir, overlap=2, gold=gold, gold_every=2)
    gold_ids = {g["id"]: g for g in gold}

    def answer(ann, correct_gold=True):
        st = s.state(ann)
        p = st["pair"]
        if p is None:
            return None
        assert "gold" not in p and "better_is_a" not in p  # the page cannot tell a gold pair
        if p["id"] in gold_ids:
            g = gold_ids[p["id"]]
            better = g["answer_a"] if g["better_is_a"] else g["answer_b"]
            left_is_better = p["left"] == better
            s.label(ann, p["id"], "a" if left_is_better == correct_gold else "b")
            return "gold"
        s.label(ann, p["id"], "a")
        return p["id"]

    # alice: gold first, two regular pairs, gold (answered wrong), then the rest
    seq = [answer("alice", correct_gold=i != 3) for i in range(7)]
    assert seq[0] == "gold" and seq[3] == "gold" and seq[1:3] == [p["id"] for p in pairs[:2]]
    assert seq[4:6] == [p["id"] for p in pairs[2:]] and seq[6] is None  # no third gold pair: none left
    mine = s.counts("alice")
    assert mine["gold_labeled"] == 2 and mine["gold_accuracy"] == 0.5 and mine["labeled"] == 4
    # bob labels pairs 0 and 1; with overlap=2 carol gets only pairs 2 and 3 (0 and 1 have two labels)
    assert [answer("bob") for _ in range(4)] == ["gold", pairs[0]["id"], pairs[1]["id"], "gold"]
    s.skip("bob", s.state("bob")["pair"]["id"])  # a skip does not count towards the overlap
    carol = [answer("carol") for _ in range(4)]
    assert carol == ["gold", pairs[2]["id"], pairs[3]["id"], None]  # no regular pair left: no more gold either
    assert s.progress()["pairs_complete"] == 4 and s.counts("carol")["remaining"] == 0
    # gold labels are calibration only: not among the run's comparisons
    comps = page_comparisons(run_dir)
    assert len(comps) == 4 + 2 + 2 and not {c["prompt"] for c in comps} & {g["prompt"] for g in gold}
    n, report = export_labels(run_dir, str(tmp_path / "maj.jsonl"), "majority")
    assert n == 4
    assert report["annotators"]["alice"]["gold_accuracy"] == 0.5 and report["annotators"]["bob"]["gold_count"] == 2
    assert report["pairs_with_several"] == 4 and report["agreement"]["units"] == 4
    rows = [json.loads(x) for x in (tmp_path / "maj.jsonl").read_text().splitlines()]
    assert all(r["annotator"] == "consensus:majority" and "probability" in r for r in rows)
    assert load_human_comparisons(tmp_path / "maj.jsonl")  # the import format


def test_combine_human_by_hand():
    truth = [1, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    wrong = {"good1": {0}, "good2": {4}, "good3": {7}, "adversary": set(range(10))}
    comps = []
    for u, t in enumerate(truth):
        for ann, bad in wrong.items():
            label = float(1 - t if u in bad else t)
            a, b = f"answer {u} one", f"answer {u} two"
            if ann == "good2":  # shown in the other order: the label is flipped back when combined
                a, b, label = b, a, 1 - label
            comps.append(human_comparison(f"prompt {u}", f"p{u}", "", a, b, ann, label))
    out, rep = combine_human(comps, "dawid_skene")
    assert [round(c["soft_label"]) for c in out] == truth
    assert rep["annotators"]["adversary"]["reliability"] < 0.05 and rep["annotators"]["good1"]["reliability"] > 0.8
    maj, _ = combine_human(comps, "majority")
    assert [c["soft_label"] for c in maj].count(0.5) == 3  # two against two where one good annotator erred
    mean, _ = combine_human(comps, "mean")
    assert mean[0]["soft_label"] == pytest.approx(2 / 4) and mean[1]["soft_label"] == pytest.approx(3 / 4)
    none, rep = combine_human(comps, "none")
    assert none == comps and rep["agreement"]["units"] == 10


def test_labeling_page_overlap_and_gold_in_headless_chromium(tmp_path, chromium):
    from playwright.sync_api import expect

    rows, golds = pair_rows(4), gold_rows(2)
    args = ["run=web", f"runs_dir={tmp_path}", f"pairs={write_jsonl(tmp_path / 'pairs.jsonl', rows)}", "port=0",
            f"gold={write_jsonl(tmp_path / 'gold.jsonl', golds)}", "gold_every=2", "overlap=1"]
    srv = Server(*args)
    page = chromium.new_page()
    page.set_default_timeout(10_000)
    prompt, left, gold = page.locator("#prompt"), page.locator("#left"), page.locator("#gold")

    def answer_gold(correct: bool):
        expect(prompt).to_have_text(re.compile("^(" + "|".join(re.escape(g["prompt"]) for g in golds) + ")$"))
        g = next(g for g in golds if g["prompt"] == prompt.text_content())
        page.keyboard.press("1" if (left.text_content() == g["better"]) == correct else "2")

    def answer(i):
        expect(prompt).to_have_text(rows[i]["prompt"])
        page.keyboard.press("1")

    page.goto(srv.url + "&annotator=alice")
    expect(prompt).not_to_have_text("")
    answer_gold(True)  # a gold pair first
    expect(gold).to_have_text("your accuracy on check pairs: 100% of 1")
    answer(0)
    answer(1)
    answer_gold(False)  # after two regular pairs, another gold pair
    expect(gold).to_have_text("your accuracy on check pairs: 50% of 2")
    answer(2)
    # bob: with overlap=1 the pairs alice labeled are not his
    page.fill("#annotator", "bob")
    page.press("#annotator", "Enter")
    expect(gold).to_have_text("")
    answer_gold(True)
    answer(3)
    expect(page.locator("#done")).to_be_visible()
    expect(page.locator("#progress")).to_contain_text("(4 with 1 labels)")
    summary = srv.stop()
    assert "0.50 (2)" in summary and "1.00 (1)" in summary  # each annotator's gold accuracy
    page.close()
    comps = page_comparisons(tmp_path / "web")
    assert sorted(c["prompt"] for c in comps) == sorted(r["prompt"] for r in rows)  # no gold, no pair twice
