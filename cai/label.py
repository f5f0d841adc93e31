"""`python -m cai.label run=NAME`: a web page on which people label answer pairs and write better answers.

The pairs are the run's AI-labeled pairs (every distinct pair in `rl/round-*/comparisons.jsonl`, so AI and
human labels of the same pairs can be compared), or `pairs=FILE.jsonl` (prompt, answer_a, answer_b, optional
prompt_id, category). The server binds 127.0.0.1 only and answers only requests that carry the random token
printed at start. Each annotator sees the two answers in an order drawn per (annotator, pair) by a seeded
hash, recorded with the label and mapped back to the stored order.

Every action is an event appended to `<run>/human/labels.jsonl` (a JsonlStore, fsynced per event): label,
skip, demonstration ("a better answer") and undo. Each action's answer carries its event id; an undo names the
id it cancels and is refused (409) unless that is still the annotator's latest un-cancelled label, skip or
demonstration, so a page undoes only its own last action, never one another tab (or someone typing the same
name) made since. Undo events themselves are never cancelled (a second undo goes one step further back; there
is no redo). Replaying the events gives each annotator's state, so a killed server
restarts exactly where every annotator stopped. A lock on `human/.lock` keeps a second server off the store.

Requests are bounded: one ASCII-digit Content-Length up to 256 KiB, text that is valid Unicode (no unpaired
surrogates), and a socket timeout (`timeout=`) so a stalled browser does not hold a thread. `export=` and
`export_demonstrations=` refuse any path inside `<run>/human/` (the live event log and its lock) and replace
their file atomically.

Other stages read the labels through `page_comparisons` (comparison records of the shape `cai.human`
produces) and `page_demonstrations` (SFT records); `export=FILE` writes them in `cai.human`'s import format.
This module imports no torch.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from cai.config import LabelConfig, build_config, help_text, parse_overrides
from cai.errors import CaiError, cli_main
from cai.human import (
    apply_event,
    combine_human,
    gold_scores,
    labels_path,
    page_comparisons,
    page_demonstrations,
    page_gold,
    replay,
)
from cai.io import has_lone_surrogate, json_objects, parse_json, table, write_jsonl_atomic
from cai.prompts import load_labeled_set
from cai.records import pair_hash, prompt_id_for, stable_hash
from cai.runs import RunLock, run_dir_for
from cai.store import JsonlStore

HOST = "127.0.0.1"  # never anything else: the page has no login beyond the token
PAGE = Path(__file__).parent / "web" / "label.html"
CHOICES = {"a": "left", "b": "right", "tie": "tie"}  # on-screen choices the API takes
EVENTS = ("label", "skip", "demonstration", "undo")
MAX_BODY = 256 * 1024
MAX_ANSWER_CHARS = 20_000
MAX_ANNOTATOR_CHARS = 64
_LENGTH = re.compile(r"[0-9]{1,15}")  # ASCII digits only: str.isdigit() and int() also take "²" and "١"


# --- pairs -------------------------------------------------------------------------------------------------


def pair_id(prompt: str, a: str, b: str) -> str:
    """The same for (a, b) and (b, a) (cai.records.pair_identity), as a short id for the page."""
    return pair_hash(prompt, a, b, kind="page-pair", n=16)


PAIR_FIELDS = ("prompt", "answer_a", "answer_b", "prompt_id", "category")


def _check_text(path: Path, n: int, row: dict) -> None:
    """Text a page shows and a store writes must be encodable: JSON's "\\ud800" escape alone is not."""
    for field in PAIR_FIELDS:
        if has_lone_surrogate(row.get(field)):
            raise CaiError(f"{path}:{n}: {field}: holds an unpaired surrogate (a \\ud800-\\udfff escape alone); "
                           "expected Unicode text")


def _pair(path: Path, n: int, row: dict) -> dict:
    for field in ("prompt", "answer_a", "answer_b"):
        v = row.get(field)
        if not isinstance(v, str) or not v.strip():
            raise CaiError(f"{path}:{n}: {field}: expected a non-empty string")
    for field in ("prompt_id", "category"):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise CaiError(f"{path}:{n}: {field}: expected a string")
    if row["answer_a"] == row["answer_b"]:
        raise CaiError(f"{path}:{n}: answer_b: expected a different answer from answer_a (they are identical)")
    prompt = row["prompt"]
    return {"id": pair_id(prompt, row["answer_a"], row["answer_b"]), "prompt": prompt,
            "prompt_id": row.get("prompt_id") or prompt_id_for(prompt),
            "category": row.get("category") or "", "answer_a": row["answer_a"], "answer_b": row["answer_b"]}


def load_pairs(run_dir: Path, pairs_file: str = "") -> tuple[list[dict], int]:
    """The distinct pairs to label, in file order (first occurrence wins), and how many rows were left out.

    From pairs_file every row must be a valid pair. From the run's comparisons, pairs a person cannot label
    (an empty answer, or two identical answers) are left out and counted.
    """
    if pairs_file:
        files, strict = [Path(pairs_file).expanduser()], True
    else:
        files = sorted((run_dir / "rl").glob("round-*/comparisons.jsonl"),
                       key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
        strict = False
    pairs, seen, left_out = [], set(), 0
    for path in files:
        for n, row in json_objects(path):
            _check_text(path, n, row)  # never left out quietly: the file is damaged
            try:
                p = _pair(path, n, row)
            except CaiError:
                if strict or not all(isinstance(row.get(f), str) for f in ("prompt", "answer_a", "answer_b")):
                    raise
                left_out += 1
                continue
            if p["id"] not in seen:
                seen.add(p["id"])
                pairs.append(p)
    if not pairs:
        where = pairs_file or f"{run_dir}/rl/round-*/comparisons.jsonl"
        raise CaiError(f"{where}: no pairs to label; run stage=rl first, or give pairs=FILE")
    return pairs, left_out


def load_gold(path: str, pairs: list[dict]) -> list[dict]:
    """Gold pairs (the clear-pairs format: id, category, prompt, better, worse) as page pairs with their answer:
    which answer is stored first is drawn by a hash of the pair; `better_is_a` says which is better."""
    ids = {p["id"] for p in pairs}
    out = []
    for r in load_labeled_set(path):
        pid = pair_id(r["prompt"], r["better"], r["worse"])
        if pid in ids:
            raise CaiError(f"gold={path}: pair {r['id']} is also one of the pairs to label; expected separate pairs")
        better_is_a = int(pid, 16) % 2 == 1
        a, b = (r["better"], r["worse"]) if better_is_a else (r["worse"], r["better"])
        out.append({"id": pid, "prompt": r["prompt"], "prompt_id": r["id"], "category": r["category"],
                    "answer_a": a, "answer_b": b, "gold": True, "better_is_a": better_is_a})
    return out


def is_swapped(seed: int, annotator: str, pid: str) -> bool:
    """Whether answer_b is shown on the left: a seeded hash per (annotator, pair), so no position pattern."""
    return int(stable_hash({"kind": "page-order", "seed": seed, "annotator": annotator, "pair": pid}), 16) % 2 == 1


# --- events ------------------------------------------------------------------------------------------------


def check_export_path(run_dir: Path, path: str, setting: str = "export") -> Path:
    """An export target outside `<run>/human/`, which the server owns (labels.jsonl, its lock): an export never
    replaces the live event log. Symlinks are followed. The file itself is replaced atomically (cai.io)."""
    target = Path(path).expanduser().resolve()
    human = labels_path(run_dir).parent.resolve()
    if target == human or human in target.parents:
        raise CaiError(f"{setting}={path}: is inside {labels_path(run_dir).parent}, which the labeling server owns "
                       f"(its event log {labels_path(run_dir).name}); export to a file elsewhere")
    return target


def export_labels(run_dir: Path, path: str, combine: str = "none") -> tuple[int, dict]:
    """Labels in the import format of cai.human.load_human_comparisons: every label (combine=none), or one row
    per pair with the combined probability (majority | mean | dawid_skene); returns how many rows, and the
    agreement and reliability report (cai.human.combine_human)."""
    target = check_export_path(run_dir, path)
    comps = page_comparisons(run_dir)
    if not comps:
        raise CaiError(f"{labels_path(run_dir)}: no labels yet; nothing to export")
    combined, report = combine_human(comps, combine, page_gold(run_dir))
    rows = []
    for c in combined:
        label = ({"choice": {1.0: "a", 0.0: "b", 0.5: "tie"}[c["soft_label"]]} if combine == "none"
                 else {"probability": c["soft_label"]})
        rows.append({"prompt": c["prompt"], "answer_a": c["answer_a"], "answer_b": c["answer_b"], **label,
                     "annotator": c["annotator"], "prompt_id": c["prompt_id"], **({"category": c["category"]}
                                                                                   if c["category"] else {})})
    write_jsonl_atomic(target, rows)
    return len(rows), report


def print_human_report(report: dict) -> None:
    """Each annotator's gold accuracy, reliability and agreement with the combined label; their agreement."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [(a, r["labels"], f"{fmt(r['gold_accuracy'])} ({r['gold_count']})", fmt(r["reliability"]),
             fmt(r["agreement_with_consensus"])) for a, r in report["annotators"].items()]
    print(table(rows, ("annotator", "pairs", "gold accuracy (n)", "reliability (Dawid-Skene)",
                       f"agrees with {report['combine'] if report['combine'] != 'none' else 'mean'}")))
    a = report.get("agreement")
    if a:
        print(f"agreement on {a['units']} pairs labeled by two or more: pairwise {fmt(a['pairwise_agreement']['mean'])}, "
              f"Fleiss' kappa {fmt(a['fleiss_kappa'])} (n={a['fleiss_units']}), Krippendorff's alpha nominal "
              f"{fmt(a['alpha_nominal'])}")


def export_demonstrations(run_dir: Path, path: str) -> int:
    """Better answers in the import format of cai.human.load_demonstrations; returns how many."""
    target = check_export_path(run_dir, path, "export_demonstrations")
    rows = [{"prompt": d["prompt"][0]["content"], "answer": d["completion"][0]["content"],
             "annotator": d["annotator"], "prompt_id": d["prompt_id"]} for d in page_demonstrations(run_dir)]
    if not rows:
        raise CaiError(f"{labels_path(run_dir)}: no better answers yet; nothing to export")
    write_jsonl_atomic(target, rows)
    return len(rows)


# --- the labeling session: pairs + event store + replayed state, behind one lock ----------------------------


class RequestError(Exception):
    """A request the page should not have sent: (HTTP status, one-line message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class LabelSession:
    """The pairs, the event store and every annotator's replayed state; writes are serialized by `lock`."""

    def __init__(self, pairs: list[dict], run_dir: Path, seed: int = 0, overlap: int = 0,
                 gold: list[dict] = (), gold_every: int = 5):
        self.pairs, self.seed, self.overlap, self.gold_every = pairs, seed, overlap, gold_every
        self.gold = list(gold)
        self.by_id = {p["id"]: p for p in pairs + self.gold}
        self.store = JsonlStore(labels_path(run_dir))
        self.active = replay(list(self.store.records.values()), f"{self.store.path}: ")
        self.seq = Counter(e["annotator"] for e in self.store.records.values())
        self.added: Counter = Counter()  # (annotator, event) -> events this session
        self.lock = threading.Lock()

    # reads
    def _done(self, annotator: str) -> dict[str, str]:
        return {e["pair"]: e["event"] for e in self.active.get(annotator, []) if e["event"] in ("label", "skip")}

    def _labelers(self) -> Counter:
        """pair id -> how many annotators labeled it (for overlap)."""
        return Counter(e["pair"] for evs in self.active.values() for e in evs if e["event"] == "label")

    def _open_pairs(self, annotator: str, done: dict) -> list[dict]:
        """The regular pairs this annotator may still get: not done by them, and (overlap=N) labeled by fewer
        than N people."""
        n = self._labelers() if self.overlap else None
        return [p for p in self.pairs if p["id"] not in done and (n is None or n[p["id"]] < self.overlap)]

    def _next_gold(self, annotator: str, done: dict) -> dict | None:
        """A gold pair when one is due (one first, then one after every gold_every regular pairs), in an order
        drawn per annotator."""
        if not self.gold:
            return None
        regular = sum(1 for k in done if k in self.by_id and not self.by_id[k].get("gold"))
        gold_done = sum(1 for k in done if k in self.by_id and self.by_id[k].get("gold"))
        if gold_done * self.gold_every > regular:
            return None
        left = [g for g in self.gold if g["id"] not in done]
        key = lambda g: stable_hash({"kind": "gold-order", "seed": self.seed, "annotator": annotator, "pair": g["id"]})  # noqa: E731
        return min(left, key=key) if left else None

    def counts(self, annotator: str) -> dict:
        done = self._done(annotator)
        kinds = Counter(v for k, v in done.items() if k in self.by_id and not self.by_id[k].get("gold"))
        demos = sum(e["event"] == "demonstration" for e in self.active.get(annotator, []))
        gold = gold_scores(self.active.get(annotator, [])).get(annotator, {"count": 0, "correct": 0.0})
        return {"labeled": kinds["label"], "skipped": kinds["skip"], "total": len(self.pairs), "demonstrations": demos,
                "remaining": len(self._open_pairs(annotator, done)), "gold_labeled": gold["count"],
                "gold_accuracy": gold["correct"] / gold["count"] if gold["count"] else None}

    def progress(self) -> dict:
        n = self._labelers()
        labeled_pairs = {p["id"] for p in self.pairs if n[p["id"]]}
        per = {a: self.counts(a) for a in sorted(self.active) if self.active[a]}
        return {"pairs_labeled": len(labeled_pairs), "total": len(self.pairs), "overlap": self.overlap,
                "pairs_complete": sum(n[p["id"]] >= self.overlap for p in self.pairs) if self.overlap else None,
                "labels": sum(c["labeled"] for c in per.values()), "annotators": per}

    def state(self, annotator: str, message: str = "") -> dict:
        """What the page shows an annotator: the next pair (left/right in their order), progress. Nothing on the
        page tells a gold pair from another."""
        with self.lock:
            done = self._done(annotator)
            regular = self._open_pairs(annotator, done)
            nxt = (self._next_gold(annotator, done) or regular[0]) if regular else None
            view = None
            if nxt is not None:
                swapped = is_swapped(self.seed, annotator, nxt["id"])
                view = {"id": nxt["id"], "prompt": nxt["prompt"], "category": nxt["category"],
                        "left": nxt["answer_b"] if swapped else nxt["answer_a"],
                        "right": nxt["answer_a"] if swapped else nxt["answer_b"]}
            return {"annotator": annotator, "pair": view, "mine": self.counts(annotator), "all": self.progress(),
                    "can_undo": bool(self.active.get(annotator)), "message": message}

    # writes (one event each, fsynced before the answer goes back)
    def _append(self, annotator: str, event: str, **fields) -> dict:
        seq = self.seq[annotator]
        ev = {"key": stable_hash({"kind": "page-event", "annotator": annotator, "seq": seq}), "event": event,
              "annotator": annotator, "seq": seq, "time": round(time.time(), 3), **fields}
        self.store.append([ev])
        apply_event(self.active, ev)
        self.seq[annotator] += 1
        self.added[annotator, event] += 1
        return ev

    def _open_pair(self, annotator: str, pid: str) -> dict:
        if pid not in self.by_id:
            raise RequestError(400, f"pair: no pair {pid!r} on this page")
        done = self._done(annotator).get(pid)
        if done:
            raise RequestError(409, f"{annotator} already {'skipped' if done == 'skip' else 'labeled'} this pair")
        return self.by_id[pid]

    def label(self, annotator: str, pid: str, choice: str) -> dict:
        if choice not in CHOICES:
            raise RequestError(400, f"choice: expected a (left better), b (right better) or tie, got {choice!r}")
        with self.lock:
            p = self._open_pair(annotator, pid)
            swapped = is_swapped(self.seed, annotator, pid)
            left_better = {"a": 1.0, "b": 0.0, "tie": 0.5}[choice]
            soft = 1.0 - left_better if swapped else left_better  # P(stored answer_a is better)
            gold = {"gold": True, "better_is_a": p["better_is_a"]} if p.get("gold") else {}
            ev = self._append(annotator, "label", pair=pid, swapped=swapped, choice=choice, soft_label=soft,
                              prompt=p["prompt"], prompt_id=p["prompt_id"], category=p["category"],
                              answer_a=p["answer_a"], answer_b=p["answer_b"], **gold)
        return {**self.state(annotator, f"labeled: {CHOICES[choice]}" + (" better" if choice != "tie" else "")),
                "event": ev["key"]}

    def skip(self, annotator: str, pid: str) -> dict:
        with self.lock:
            self._open_pair(annotator, pid)
            ev = self._append(annotator, "skip", pair=pid, swapped=is_swapped(self.seed, annotator, pid))
        return {**self.state(annotator, "skipped"), "event": ev["key"]}

    def demonstrate(self, annotator: str, pid: str, answer: str) -> dict:
        if not isinstance(answer, str) or not answer.strip():
            raise RequestError(400, "answer: expected a non-empty string")
        if len(answer) > MAX_ANSWER_CHARS:
            raise RequestError(400, f"answer: at most {MAX_ANSWER_CHARS} characters, got {len(answer)}")
        with self.lock:
            if pid not in self.by_id:
                raise RequestError(400, f"pair: no pair {pid!r} on this page")
            p = self.by_id[pid]
            ev = self._append(annotator, "demonstration", pair=pid, prompt=p["prompt"], prompt_id=p["prompt_id"],
                              answer=answer)
        return {**self.state(annotator, "better answer saved"), "event": ev["key"]}

    def undo(self, annotator: str, key) -> dict:
        """Cancel the action `key` (the id the label/skip/demonstration answer carried as "event"), only if it is
        still the annotator's latest: a page undoes its own last action, never what another tab did since."""
        if not isinstance(key, str) or not key:
            raise RequestError(400, "undoes: expected the id (\"event\") of the action to undo")
        with self.lock:
            stack = self.active.get(annotator)
            if not stack:
                raise RequestError(409, f"nothing to undo for {annotator}")
            last = stack[-1]
            if last["key"] != key:
                raise RequestError(409, f"nothing undone: {annotator} acted since (in another tab or window?); only "
                                        "the latest action can be undone")
            self._append(annotator, "undo", undoes=last["key"], pair=last["pair"])
        return {**self.state(annotator, f"undid the {last['event']}"), "undid": key}


# --- HTTP ----------------------------------------------------------------------------------------------------


def check_annotator(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(400, "annotator: expected a non-empty name")
    name = value.strip()
    if has_lone_surrogate(name):
        raise RequestError(400, "annotator: holds an unpaired surrogate; expected Unicode text")
    if len(name) > MAX_ANNOTATOR_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise RequestError(400, f"annotator: expected at most {MAX_ANNOTATOR_CHARS} printable characters")
    return name


def content_length(headers) -> int:
    """One Content-Length of ASCII digits (no Transfer-Encoding), at most MAX_BODY (else 413)."""
    if headers.get("Transfer-Encoding") is not None:
        raise RequestError(411, "Transfer-Encoding is not accepted; send the body with a Content-Length")
    values = headers.get_all("Content-Length") or []
    if len(values) != 1 or not _LENGTH.fullmatch(values[0].strip()):
        raise RequestError(400, "expected one Content-Length header (a number of bytes, ASCII digits)")
    if int(values[0]) > MAX_BODY:
        raise RequestError(413, f"request body over {MAX_BODY} bytes")
    return int(values[0])


def make_handler(session: LabelSession, token: str, socket_timeout: float = 30.0):
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        timeout = socket_timeout  # a socket timeout: a browser that stalls mid-request loses its connection, not a thread

        def log_message(self, *args):  # quiet: request lines carry the token
            pass

        def _send(self, status: int, data: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Content-Type-Options", "nosniff")
            if ctype.startswith("text/html"):
                self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                                 "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                                 "form-action 'none'; frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (a garbled request line, too many headers, an unknown method): JSON too."""
            self.close_connection = True
            self._json(code, {"error": f"{message or self.responses.get(code, ('error',))[0]} ({code})"})

        def _json(self, status: int, body: dict) -> None:
            self._send(status, json.dumps(body, ensure_ascii=False).encode())

        def _route(self) -> tuple[str, dict] | None:
            """(path, query) when the request carries the token (query or X-Cai-Token header), else a 403."""
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            given = self.headers.get("X-Cai-Token") or query.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                self._json(403, {"error": "missing or wrong token: open the URL the server printed at start"})
                return None
            return url.path, query

        def _handle(self, fn) -> None:
            try:
                self._json(200, fn())
            except RequestError as e:
                self._json(e.status, {"error": str(e)})
            except Exception as e:  # a bug: the page gets an answer, the terminal the traceback
                traceback.print_exc(file=sys.stderr)
                self.close_connection = True
                self._json(500, {"error": f"internal error ({type(e).__name__}); see the server's terminal"})

        def do_GET(self):
            route = self._route()
            if route is None:
                return
            path, query = route
            if path == "/":
                return self._send(200, page, "text/html; charset=utf-8")
            if path == "/api/state":
                return self._handle(lambda: session.state(check_annotator(query.get("annotator"))))
            if path == "/api/progress":
                return self._handle(lambda: session_progress(session))
            self._json(404, {"error": f"no page {path}"})

        def do_POST(self):
            route = self._route()
            if route is None:
                return
            path, _ = route
            actions = {"/api/label": lambda b, a: session.label(a, b.get("pair"), b.get("choice")),
                       "/api/skip": lambda b, a: session.skip(a, b.get("pair")),
                       "/api/demonstration": lambda b, a: session.demonstrate(a, b.get("pair"), b.get("answer")),
                       "/api/undo": lambda b, a: session.undo(a, b.get("undoes"))}
            if path not in actions:
                self.close_connection = True
                return self._json(404, {"error": f"no action {path}"})
            try:
                length = content_length(self.headers)
            except RequestError as e:
                self.close_connection = True  # a body may follow that nobody reads
                return self._json(e.status, {"error": str(e)})
            data = self.rfile.read(length)
            if len(data) < length:
                self.close_connection = True
                return self._json(400, {"error": f"body: {len(data)} of the {length} bytes Content-Length announced"})
            try:
                body = parse_json(data.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                return self._json(400, {"error": "body: expected a JSON object"})
            if not isinstance(body, dict):
                return self._json(400, {"error": "body: expected a JSON object"})
            if has_lone_surrogate(body):
                if has_lone_surrogate(body.get("annotator")):
                    return self._json(400, {"error": "annotator: holds an unpaired surrogate; expected Unicode text"})
                return self._json(400, {"error": "body: a string holds an unpaired surrogate; expected Unicode text"})

            def act():
                annotator = check_annotator(body.get("annotator"))
                if path != "/api/undo" and not isinstance(body.get("pair"), str):
                    raise RequestError(400, "pair: expected a pair id")
                return actions[path](body, annotator)

            self._handle(act)

    return Handler


def session_progress(session: LabelSession) -> dict:
    with session.lock:
        return session.progress()


def start_server(session: LabelSession, port: int = 0, timeout: float = 30.0) -> tuple[ThreadingHTTPServer, str]:
    """A server on 127.0.0.1 (not yet serving) and its URL with a fresh random token; `timeout`: seconds a
    client may stall mid-request before its connection (and thread) is let go."""
    token = secrets.token_urlsafe(24)
    server = ThreadingHTTPServer((HOST, port), make_handler(session, token, timeout))
    server.daemon_threads = True
    return server, f"http://{HOST}:{server.server_address[1]}/?token={token}"


def print_summary(session: LabelSession) -> None:
    p = session_progress(session)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [(a, c["labeled"], c["skipped"], c["demonstrations"], session.added[a, "label"],
             f"{fmt(c['gold_accuracy'])} ({c['gold_labeled']})") for a, c in p["annotators"].items()]
    print(f"\n{p['pairs_labeled']} of {p['total']} pairs labeled by at least one annotator; {p['labels']} labels "
          f"in {session.store.path}")
    if rows:
        print(table(rows, ("annotator", "labels", "skipped", "better answers", "labels this session",
                           "gold accuracy (n)")))


@cli_main
def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print("\n".join(help_text(LabelConfig)))
        return 0
    cfg = build_config(LabelConfig, {}, "command line", parse_overrides(argv))
    if not cfg.run:
        raise CaiError("run: expected run=NAME (labels go to <runs_dir>/<run>/human/labels.jsonl)")
    run_dir = run_dir_for(cfg)
    if cfg.export or cfg.export_demonstrations:
        # both targets checked before either is written
        targets = [check_export_path(run_dir, v, k) for k, v in (("export", cfg.export),
                                                                  ("export_demonstrations", cfg.export_demonstrations)) if v]
        if len(targets) == 2 and targets[0] == targets[1]:
            raise CaiError(f"export_demonstrations={cfg.export_demonstrations}: the same file as export=; give two files")
        if cfg.export:
            n, report = export_labels(run_dir, cfg.export, cfg.combine)
            print(f"{n} {'labels' if cfg.combine == 'none' else f'pairs ({cfg.combine})'} -> {cfg.export}")
            print_human_report(report)
        if cfg.export_demonstrations:
            print(f"{export_demonstrations(run_dir, cfg.export_demonstrations)} better answers -> "
                  f"{cfg.export_demonstrations}")
        return 0
    if not 0 <= cfg.port <= 65535:
        raise CaiError(f"port={cfg.port}: expected 0 (any free port) to 65535")
    pairs, left_out = load_pairs(run_dir, cfg.pairs)
    gold = load_gold(cfg.gold, pairs) if cfg.gold else []
    with RunLock(run_dir / "human"):
        session = LabelSession(pairs, run_dir, cfg.seed, cfg.overlap, gold, cfg.gold_every)
        try:
            server, url = start_server(session, cfg.port, cfg.timeout)
        except OSError as e:
            raise CaiError(f"port={cfg.port}: cannot listen on {HOST} ({e.strerror})") from None
        skipped = f" ({left_out} rows with an empty or repeated answer left out)" if left_out else ""
        print(f"{len(pairs)} pairs from {cfg.pairs or run_dir / 'rl'}{skipped}"
              + (f", each for {cfg.overlap} annotator(s)" if cfg.overlap else "")
              + (f"; {len(gold)} gold pairs from {cfg.gold}, one every {cfg.gold_every}" if gold else "")
              + f"; labels go to {session.store.path}")
        print(f"labeling page: {url}", flush=True)
        # Ctrl+C (and a plain `kill`) stop the server with its summary, also when it was started with SIGINT
        # ignored, as a child of a background job is: Python then installs no KeyboardInterrupt handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            print_summary(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
