"""Human feedback on the same interfaces as AI feedback: comparisons, rankings, demonstrations, mixing.

- `load_human_comparisons`: pairwise labels (a choice, or a graded probability) -> comparison records of the
  shape `cai.feedback.label_pairs` produces (source="human"), so the preference model trains on either;
- `load_human_rankings`: InstructGPT-style rankings of K answers (2 <= K <= 9) -> all K*(K-1)/2 pairs, the
  better answer shown first or second by a hash of the pair (no position pattern to learn);
- `load_demonstrations`: human-written answers -> SFT records (InstructGPT's first step), the shape of
  `cai.critique.sft_examples`;
- `page_comparisons` / `page_demonstrations`: the labeling page's labels and better answers (its event log,
  `<run>/human/labels.jsonl`, replayed), so stages read them without importing the web server;
- `merge_sources`: AI and human comparisons for `feedback.source=mixed` (human_first, or by_category: the CAI
  paper's hybrid of human helpfulness labels and AI harmlessness labels).

Every bad row is a CaiError naming file, line and field. For CSV, LINE is the line on which the record starts
(header = line 1); empty CSV cells count as absent.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from cai.agreement import agreement_report, dawid_skene, hard_choice
from cai.errors import CaiError
from cai.io import json_objects, read_text
from cai.records import demonstration, human_comparison, pair_hash, pair_identity, prompt_id_for
from cai.runs import RunPaths
from cai.store import JsonlStore

CHOICES = {"a": 1.0, "A": 1.0, "b": 0.0, "B": 0.0, "tie": 0.5}
MIN_RANKING, MAX_RANKING = 2, 9
MERGE_RULES = ("human_first", "by_category")
COMBINE = ("none", "majority", "mean", "dawid_skene")
DEFAULT_ANNOTATOR = "anonymous"

_COMPARISON_FIELDS = ("prompt", "answer_a", "answer_b", "choice", "probability", "annotator", "prompt_id", "category")
_RANKING_FIELDS = ("prompt", "ranking", "annotator", "prompt_id", "category")
_DEMO_FIELDS = ("prompt", "answer", "annotator", "prompt_id", "category")


# --- reading rows ------------------------------------------------------------------------------------------


def _rows(path: str | Path, fields: tuple[str, ...], csv_ok: bool = True) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank row of a .jsonl (or .csv) file; unknown fields are errors."""
    path = Path(path)
    suffixes = (".jsonl", ".csv") if csv_ok else (".jsonl",)
    if path.suffix.lower() not in suffixes:
        raise CaiError(f"{path}: expected a {' or '.join(suffixes)} file, got {path.suffix or 'no suffix'!r}")
    rows = []
    if path.suffix.lower() == ".jsonl":
        rows = [(n, {k: v for k, v in row.items() if v is not None}) for n, row in json_objects(path)]
    else:
        text = read_text(path)
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        end = 0
        try:
            header = next(reader, None)
            if header is None:
                raise CaiError(f"{path}: empty file; expected a header line with {', '.join(fields[:3])}, ...")
            header = [h.strip() for h in header]
            dup = sorted({h for h in header if header.count(h) > 1})
            if dup:
                raise CaiError(f"{path}:1: column {dup[0]!r} appears twice in the header")
            unknown = [h for h in header if h not in fields]
            if unknown:
                raise CaiError(f"{path}:1: unknown column {unknown[0]!r}; expected columns: {', '.join(fields)}")
            end = reader.line_num
            for cells in reader:
                start, end = end + 1, reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise CaiError(f"{path}:{start}: expected {len(header)} fields as in the header, got {len(cells)}")
                rows.append((start, {h: c for h, c in zip(header, cells) if c.strip()}))
        except csv.Error as e:
            raise CaiError(f"{path}:{end + 1}: invalid CSV ({e})") from None
    for n, row in rows:
        unknown = sorted(set(row) - set(fields))
        if unknown:
            raise CaiError(f"{path}:{n}: unknown field {unknown[0]!r}; expected fields: {', '.join(fields)}")
    if not rows:
        raise CaiError(f"{path}: no rows")
    return rows


def _text(path, n: int, row: dict, field: str, default: str | None = None) -> str:
    v = row.get(field)
    if v is None and default is not None:
        return default
    if not isinstance(v, str) or not v.strip():
        raise CaiError(f"{path}:{n}: {field}: expected a non-empty string")
    return v


def _common(path, n: int, row: dict) -> tuple[str, str, str, str]:
    """prompt, annotator, prompt_id, category of a row."""
    prompt = _text(path, n, row, "prompt")
    annotator = _text(path, n, row, "annotator", DEFAULT_ANNOTATOR)
    prompt_id = _text(path, n, row, "prompt_id", prompt_id_for(prompt))
    category = _text(path, n, row, "category", "")
    return prompt, annotator, prompt_id, category


def _check_unique(path, seen: dict, key: str, n: int, what: str) -> None:
    if key in seen:
        raise CaiError(f"{path}:{n}: duplicate of line {seen[key]} ({what})")
    seen[key] = n


# --- comparisons -------------------------------------------------------------------------------------------


def human_pair_key(prompt: str, a: str, b: str) -> str:
    """The same for (a, b) and (b, a): the pair, whichever answer was shown first."""
    return pair_hash(prompt, a, b, kind="human-pair")


def _soft_label(path, n: int, row: dict) -> float:
    has_choice, has_prob = "choice" in row, "probability" in row
    if has_choice == has_prob:
        raise CaiError(f"{path}:{n}: choice/probability: expected exactly one of choice (a, b or tie) or "
                       f"probability (P(answer_a is better), 0 to 1), got {'both' if has_choice else 'neither'}")
    if has_choice:
        c = row["choice"]
        c = c.strip() if isinstance(c, str) else c
        if not isinstance(c, str) or c not in CHOICES:
            raise CaiError(f"{path}:{n}: choice: expected one of a, b, A, B, tie, got {row['choice']!r}")
        return CHOICES[c]
    p = row["probability"]
    if isinstance(p, str) and path.suffix.lower() == ".csv":
        try:
            p = float(p)
        except ValueError:
            pass
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
        raise CaiError(f"{path}:{n}: probability: expected a number from 0 to 1, got {row['probability']!r}")
    if not 0.0 <= p <= 1.0:
        raise CaiError(f"{path}:{n}: probability: expected a number from 0 to 1, got {p}")
    return float(p)


def load_human_comparisons(path: str | Path) -> list[dict]:
    """Pairwise human labels (.jsonl or .csv) -> comparison records (source="human").

    Fields: prompt, answer_a, answer_b, then either choice (a/b/A/B/tie) or probability (P(answer_a is
    better)); optional annotator (default "anonymous"), prompt_id (default a hash of the prompt), category.
    """
    path = Path(path)
    out, seen = [], {}
    for n, row in _rows(path, _COMPARISON_FIELDS):
        prompt, annotator, prompt_id, category = _common(path, n, row)
        a = _text(path, n, row, "answer_a")
        b = _text(path, n, row, "answer_b")
        if a == b:
            raise CaiError(f"{path}:{n}: answer_b: expected a different answer from answer_a (they are identical)")
        rec = human_comparison(prompt, prompt_id, category, a, b, annotator, _soft_label(path, n, row))
        _check_unique(path, seen, rec["key"], n, "same prompt, answers, annotator and label")
        out.append(rec)
    return out


def load_human_rankings(path: str | Path) -> list[dict]:
    """Rankings (.jsonl rows {"prompt", "ranking": [best, ..., worst], "annotator"}) -> all pairs of each.

    The better answer of a pair is answer_a or answer_b by a hash of the pair (soft_label 1.0 or 0.0), so the
    position carries no signal. Each record also has ranking_size=K.
    """
    path = Path(path)
    out, seen = [], {}
    for n, row in _rows(path, _RANKING_FIELDS, csv_ok=False):
        prompt, annotator, prompt_id, category = _common(path, n, row)
        ranking = row.get("ranking")
        expected = f"expected a list of {MIN_RANKING} to {MAX_RANKING} non-empty strings, best first"
        if not isinstance(ranking, list):
            got = type(ranking).__name__ if "ranking" in row else "nothing"
            raise CaiError(f"{path}:{n}: ranking: {expected}, got {got}")
        if not MIN_RANKING <= len(ranking) <= MAX_RANKING:
            raise CaiError(f"{path}:{n}: ranking: {expected}, got {len(ranking)}")
        for i, x in enumerate(ranking):
            if not isinstance(x, str) or not x.strip():
                raise CaiError(f"{path}:{n}: ranking[{i}]: expected a non-empty string")
            if x in ranking[:i]:
                raise CaiError(f"{path}:{n}: ranking[{i}]: expected distinct answers, "
                               f"same as ranking[{ranking.index(x)}]")
        k = len(ranking)
        for i in range(k):
            for j in range(i + 1, k):
                better, worse = ranking[i], ranking[j]
                flip = int(human_pair_key(prompt, better, worse), 16) % 2
                first, second = sorted([better, worse])
                a, b = (second, first) if flip else (first, second)
                rec = human_comparison(prompt, prompt_id, category, a, b, annotator, 1.0 if a == better else 0.0,
                                  ranking_size=k)
                _check_unique(path, seen, rec["key"], n, "same prompt, annotator and ranked pair")
                out.append(rec)
    return out


# --- demonstrations ----------------------------------------------------------------------------------------


def load_demonstrations(path: str | Path) -> list[dict]:
    """Human-written answers -> SFT records (source="human", round 0).

    Fields (.jsonl or .csv): prompt, answer; optional annotator, prompt_id, category (category is not kept).
    """
    path = Path(path)
    out, seen = [], {}
    for n, row in _rows(path, _DEMO_FIELDS):
        prompt, annotator, prompt_id, _ = _common(path, n, row)
        answer = _text(path, n, row, "answer")
        demo = demonstration(prompt, answer, annotator, prompt_id)
        _check_unique(path, seen, demo["key"], n, "same prompt, answer and annotator")
        out.append(demo)
    return out


# --- mixing ------------------------------------------------------------------------------------------------


def is_helpful(c: dict) -> bool:
    """A helpfulness comparison: the prompt source it was sampled for (`prompt_set`, recorded on every AI pair by
    stage=rl/dpo: the `helpful` prompt file whatever its ids and categories); for a record without one (imported
    human labels), category "helpful" or a prompt id from the shipped helpful sets ("help-...")."""
    if c.get("prompt_set"):
        return c["prompt_set"] == "helpful"
    return c.get("category") == "helpful" or str(c.get("prompt_id", "")).startswith("help-")


def merge_sources(ai: list[dict], human: list[dict], rule: str) -> list[dict]:
    """AI and human comparisons for feedback.source=mixed; pairs match by `cai.records.pair_identity` (texts, either order).

    - human_first: a pair with human labels gets all its human records (every annotator) in place of the AI
      record; AI records elsewhere; human records on pairs the AI did not label are added after.
    - by_category: helpfulness pairs (see `is_helpful`, of the AI record or any human record of the pair) get
      human labels only; an AI helpfulness record without a human label is left out, as are human labels on
      other pairs (AI labels there). The CAI paper's hybrid: human helpfulness, AI harmlessness.

    Order: the AI records' order, a pair's human records in their input order, then unmatched human pairs.
    Returns new dicts; the inputs are not changed.
    """
    if rule not in MERGE_RULES:
        raise CaiError(f"feedback.mixed_rule={rule}: expected one of {', '.join(MERGE_RULES)}")
    by_pair: dict[tuple, list[dict]] = {}
    for h in human:
        by_pair.setdefault(pair_identity(h), []).append(h)
    ai_by_pair: dict[tuple, list[dict]] = {}
    for c in ai:
        ai_by_pair.setdefault(pair_identity(c), []).append(c)

    def use_human(ident) -> bool:
        if rule == "human_first":
            return ident in by_pair
        return any(is_helpful(r) for r in ai_by_pair.get(ident, []) + by_pair.get(ident, []))

    out, done = [], set()
    for c in ai:
        ident = pair_identity(c)
        if not use_human(ident):
            out.append(dict(c))
        elif ident not in done:
            done.add(ident)
            out += [dict(h) for h in by_pair.get(ident, [])]
    for ident, hs in by_pair.items():
        if ident not in ai_by_pair and use_human(ident):
            out += [dict(h) for h in hs]
    return out


# --- several people on one pair ----------------------------------------------------------------------------


def combine_human(comps: list[dict], method: str, gold: dict[str, dict] | None = None) -> tuple[list[dict], dict]:
    """Several people's labels of the same pair (matched by `pair_identity`, either order) as one comparison per
    pair, and a report: each annotator's label count, gold accuracy (from `gold`: {annotator: {count, correct}}),
    reliability (the Dawid-Skene accuracy estimate, on every pair with a decided label) and agreement with the
    combined label; and the agreement between annotators on the pairs two or more labeled (cai.agreement).

    - none: every label stays its own record (the PM sees each person's label);
    - mean: the mean of their soft labels;
    - majority: 1 or 0 for the answer most people preferred (ties and equal votes: 0.5);
    - dawid_skene: the posterior P(answer_a is better) of two-class Dawid-Skene over every pair at once, so a
      reliable annotator outweighs an unreliable one and a reliably wrong one counts reversed.
    A combined record keeps the pair's first record's answer order and lists `annotators` and `labels`."""
    if method not in COMBINE:
        raise CaiError(f"human.combine={method}: expected one of {', '.join(COMBINE)}")
    groups: dict[tuple, list[dict]] = {}
    for c in comps:
        groups.setdefault(pair_identity(c), []).append(c)
    names = sorted({c["annotator"] for c in comps})
    units = []  # per pair: {annotator: soft label in the first record's order}
    for cs in groups.values():
        first = cs[0]
        u: dict[str, float] = {}
        for c in cs:
            u[c["annotator"]] = c["soft_label"] if c["answer_a"] == first["answer_a"] else 1 - c["soft_label"]
        units.append(u)
    hard = [{a: h for a, p in u.items() if (h := hard_choice(p)) is not None} for u in units]
    ds = dawid_skene(hard) if any(hard) else {"posterior": [0.5] * len(units), "evaluators": {}}
    combined_p = []
    for u, h, post in zip(units, hard, ds["posterior"]):
        if method == "mean":
            combined_p.append(sum(u.values()) / len(u))
        elif method == "majority":
            ones, zeros = sum(h.values()), len(h) - sum(h.values())
            combined_p.append(1.0 if ones > zeros else 0.0 if zeros > ones else 0.5)
        else:
            combined_p.append(post if h else 0.5)
    if method == "none":
        out = list(comps)
    else:
        out = []
        for cs, u, p in zip(groups.values(), units, combined_p):
            first = cs[0]
            out.append(human_comparison(first["prompt"], first["prompt_id"], first.get("category", ""),
                                        first["answer_a"], first["answer_b"], f"consensus:{method}", p,
                                        combine=method, annotators=sorted(u), labels=len(u)))
    report_p = combined_p if method != "none" else [sum(u.values()) / len(u) for u in units]
    annotators = {}
    for a in names:
        mine = [(h[a], p) for h, p in zip(hard, report_p) if a in h and hard_choice(p) is not None]
        g = (gold or {}).get(a) or {}
        annotators[a] = {"labels": sum(a in u for u in units),
                         "gold_count": g.get("count", 0),
                         "gold_accuracy": g["correct"] / g["count"] if g.get("count") else None,
                         "reliability": (ds["evaluators"].get(a) or {}).get("accuracy"),
                         "agreement_with_consensus": sum(x == hard_choice(p) for x, p in mine) / len(mine)
                         if mine else None}
    multi = [u for u in units if len(u) > 1]
    spread = sorted(({"evaluators": "annotators", "prompt_id": cs[0]["prompt_id"], "prompt": cs[0]["prompt"],
                      "labels": u, "spread": max(u.values()) - min(u.values())}
                     for cs, u in zip(groups.values(), units) if len(u) > 1), key=lambda d: -d["spread"])
    report = {"disagreements": [d for d in spread if d["spread"] > 0][:5],"combine": method, "pairs": len(units), "labels": len(comps), "pairs_with_several": len(multi),
              "annotators": annotators,
              "agreement": agreement_report([[u.get(a) for a in names] for u in multi], names)
              if multi and len(names) > 1 else None}
    return out, report


# --- the labeling page's event log (written by cai.label) ----------------------------------------------------


def labels_path(run_dir: Path) -> Path:
    return RunPaths(Path(run_dir)).labels


def apply_event(active: dict[str, list[dict]], ev: dict, where: str = "") -> None:
    """Replay one event into {annotator: [un-cancelled label/skip/demonstration events, oldest first]}."""
    stack = active.setdefault(ev["annotator"], [])
    if ev["event"] != "undo":
        stack.append(ev)
    elif stack and stack[-1]["key"] == ev["undoes"]:
        stack.pop()
    else:
        raise CaiError(f"{where}event {ev['key']}: undoes {ev['undoes']}, which is not {ev['annotator']}'s latest "
                       "un-cancelled event; the labels file was edited by hand?")


def replay(events: list[dict], where: str = "") -> dict[str, list[dict]]:
    active: dict[str, list[dict]] = {}
    for ev in events:
        apply_event(active, ev, where)
    return active


def _active_events(run_dir: Path) -> list[dict]:
    path = labels_path(run_dir)
    if not path.exists():
        return []
    events = list(JsonlStore(path).records.values())  # file order: the order they happened
    active = {e["key"] for evs in replay(events, f"{path}: ").values() for e in evs}
    return [e for e in events if e["key"] in active]


def page_comparisons(run_dir: str | Path) -> list[dict]:
    """The page's labels as comparison records (source="human", soft_label 1/0/0.5 for the stored answer_a,
    annotator kept), oldest first. Labels of gold pairs (calibration, `page_gold`) are not among them."""
    return [human_comparison(e["prompt"], e["prompt_id"], e["category"], e["answer_a"], e["answer_b"],
                             e["annotator"], e["soft_label"])
            for e in _active_events(Path(run_dir)) if e["event"] == "label" and not e.get("gold")]


def gold_scores(events: list[dict]) -> dict[str, dict]:
    """{annotator: {count, correct}} from gold-pair label events (a tie counts half)."""
    out: dict[str, dict] = {}
    for e in events:
        if e["event"] == "label" and e.get("gold"):
            g = out.setdefault(e["annotator"], {"count": 0, "correct": 0.0})
            g["count"] += 1
            g["correct"] += 0.5 if e["soft_label"] == 0.5 else float((e["soft_label"] > 0.5) == e["better_is_a"])
    return out


def page_gold(run_dir: str | Path) -> dict[str, dict]:
    """Each annotator's score on the page's gold pairs: {annotator: {count, correct}}."""
    return gold_scores(_active_events(Path(run_dir)))


def page_demonstrations(run_dir: str | Path) -> list[dict]:
    """The page's better answers as SFT records (the shape of load_demonstrations), oldest first."""
    out, seen = [], set()
    for e in _active_events(Path(run_dir)):
        if e["event"] != "demonstration":
            continue
        demo = demonstration(e["prompt"], e["answer"], e["annotator"], e["prompt_id"])
        if demo["key"] not in seen:
            seen.add(demo["key"])
            out.append(demo)
    return out
