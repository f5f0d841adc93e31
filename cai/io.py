"""Reading and writing files, torch-free: YAML with positions, one JSONL reader, atomic writers, text tables.

- `read_yaml`: `yaml.safe_load` of a file; a missing file, non-UTF-8 bytes or bad YAML is one CaiError at
  file:line:column.
- `json_objects` / `read_jsonl`: JSONL split on "\\n" only. `str.splitlines` would also split on U+2028,
  U+2029, U+0085 and other separators that JSON allows raw inside strings, so one model answer holding one
  of them would break its line in two. A line that is not one JSON object is an error naming file:line.
- `write_atomic` / `write_jsonl_atomic`: a temp file beside the target, fsync, rename, fsync of the
  directory; readers see the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from cai.errors import CaiError


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a BOM is dropped); a missing file or bad bytes is a CaiError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise CaiError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CaiError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def read_yaml(path: str | Path, what: str = "config", shown: str | None = None) -> Any:
    """yaml.safe_load of a file; a missing file, non-UTF-8 bytes or bad YAML is a CaiError at file:line:column."""
    shown = shown or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaiError(f"{shown}: {what} file not found") from None
    except UnicodeDecodeError as e:
        raise CaiError(f"{shown}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        raise CaiError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None


def load_yaml_mapping(path: str | Path) -> dict:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CaiError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def parse_json(text: str) -> Any:
    """json.loads that refuses duplicate keys (silently last-wins otherwise) and too-deep nesting."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def has_lone_surrogate(value: Any) -> bool:
    """Whether a string in `value` (nested lists and dict keys/values too) holds an unpaired surrogate: JSON's
    "\\ud800" escape parses to one, and it cannot be written as UTF-8. Iterative: any depth."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            todo += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            todo += v
    return False


def split_lines(text: str) -> list[str]:
    """Lines split on "\\n" only (a trailing "\\r" is dropped): never on the separators JSON strings may hold."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def json_objects(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not an object is an error."""
    rows = []
    for n, line in enumerate(split_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError as e:
            raise CaiError(f"{path}:{n}: invalid JSON ({e})") from None
        if not isinstance(row, dict):
            raise CaiError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file, in order (see json_objects)."""
    return [row for _, row in json_objects(path)]


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (a crash right after os.replace could otherwise lose it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Replace a file whole: write a temp file beside it, fsync, rename. Readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    write_atomic(path, jsonl_text(records))


def table(rows: list[tuple], header: tuple) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
