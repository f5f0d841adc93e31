"""Prompt sets and few-shot demonstrations.

Prompt sets are JSONL/JSON/CSV/Parquet files (or `hf:NAME` hub datasets when online) read through
`datasets`, with a configurable prompt column. Ids come from an id column when there is one, else from
the row number, so they stay stable when a file is appended to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cai.errors import CaiError
from cai.io import json_objects, read_yaml
from cai.paths import resolve_path

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FEW_SHOT_KEYS = ("prompt", "answer", "critique_request", "critique", "revision_request", "revision")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    category: str = ""


def load_prompts(source) -> list[PromptRecord]:
    """Read a prompt set described by a `PromptSource` config (path, column, id_column, ...)."""
    import datasets

    if source.limit is not None and source.limit < 0:
        raise CaiError(f"{source.path}: limit={source.limit}: expected 0 or more (or null for all)")
    datasets.disable_progress_bars()
    spec = str(source.path)
    if spec.startswith("hf:"):
        try:
            ds = datasets.load_dataset(spec[3:], split=source.split)
        except Exception as e:  # offline, unknown name, ...: say which and why
            raise CaiError(f"{spec}: could not load hub dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        where = spec
    else:
        path = resolve_path(spec)
        if not path.exists():
            raise CaiError(f"{spec}: prompt file not found")
        kind = LOADERS.get(path.suffix.lower())
        if kind is None:
            raise CaiError(f"{spec}: unsupported prompt file type '{path.suffix}'; expected one of {sorted(LOADERS)}")
        if kind == "json":
            _check_jsonl(path)
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:
            raise CaiError(f"{spec}: could not read as {kind} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        where = spec
    if source.column not in ds.column_names:
        raise CaiError(f"{where}: no column '{source.column}' (prompt column); columns are {ds.column_names}")
    ids = ds[source.id_column] if source.id_column in ds.column_names else [f"row-{i}" for i in range(len(ds))]
    cats = ds[source.category_column] if source.category_column in ds.column_names else [""] * len(ds)
    out, seen = [], {}
    for row, (pid, text, cat) in enumerate(zip(ids, ds[source.column], cats), start=1):
        if not isinstance(text, str) or not text.strip():
            raise CaiError(f"{where}: row {row}: '{source.column}' must be a non-empty string, got {text!r}")
        pid = str(pid)
        if pid in seen:
            raise CaiError(f"{where}: row {row}: duplicate id '{pid}' (first at row {seen[pid]})")
        seen[pid] = row
        out.append(PromptRecord(pid, text, "" if cat is None else str(cat)))
    return out[: source.limit] if source.limit is not None else out


def _check_jsonl(path: Path) -> None:
    """`datasets` reports a broken JSONL line without its number; find it ourselves first."""
    if path.suffix.lower() == ".jsonl":
        json_objects(path)


def check_examples(path, items: list, keys: tuple[str, ...], where: str = "") -> None:
    """Every item of a few-shot list is a mapping with exactly `keys`, each a non-empty string."""
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != set(keys):
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise CaiError(f"{path}: {where}[{i}]: expected keys {list(keys)}, got {got}")
        for k in keys:
            if not isinstance(item[k], str) or not item[k].strip():
                raise CaiError(f"{path}: {where}[{i}].{k}: expected a non-empty string")


def load_few_shot(path: str | Path, count: int) -> list[dict]:
    """The first `count` critique/revision demonstrations of a YAML list file."""
    if count == 0:
        return []
    data = read_yaml(resolve_path(path), "few-shot", shown=str(path))
    if not isinstance(data, list):
        raise CaiError(f"{path}: expected a list of demonstrations, got {type(data).__name__}")
    check_examples(path, data, FEW_SHOT_KEYS)
    if count > len(data):
        raise CaiError(f"{path}: critique.few_shot={count} but the file has only {len(data)} demonstrations")
    return data[:count]


def load_labeled_set(path: str) -> list[dict]:
    """Clear pairs (a known better answer): rows {id, category, prompt, better, worse}, harmless and helpful
    interleaved (so the first N mix both). prompts/sets/labeled_pairs.jsonl is the bundled set."""
    p = resolve_path(path)
    if not p.exists():
        raise CaiError(f"labeled_set={path}: file not found")
    rows = []
    for n, row in json_objects(p):
        missing = [k for k in ("id", "category", "prompt", "better", "worse") if not isinstance(row.get(k), str)]
        if missing:
            raise CaiError(f"{path}:{n}: missing or non-text field(s) {missing}; expected id, category, prompt, "
                           "better, worse")
        if row["category"] not in ("harmless", "helpful"):
            raise CaiError(f"{path}:{n}: category={row['category']!r}; expected harmless or helpful")
        rows.append(row)
    if not rows:
        raise CaiError(f"{path}: no labeled pairs")
    by_cat = [[r for r in rows if r["category"] == c] for c in ("harmless", "helpful")]
    return [r for i in range(len(rows)) for cat in by_cat if i < len(cat) for r in [cat[i]]]
