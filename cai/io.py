"""Reading and writing files, torch-free: YAML with positions, one JSONL reader, atomic writers, text tables.

- `read_yaml` / `parse_yaml`: the one YAML loader (every config, pipeline, constitution, context and few-shot
  file): `yaml.SafeLoader`, at most YAML_MAX_BYTES, YAML_MAX_ALIASES aliases and YAML_MAX_NODES values (also
  after expanding aliases, so a "billion laughs" file stops at once), no recursive aliases, and a duplicate
  mapping key is an error at file:line:column (`yaml.safe_load` silently keeps the last). A missing file,
  non-UTF-8 bytes or bad YAML is one CaiError at file:line:column.
- `json_objects` / `read_jsonl`: JSONL split on "\\n" only. `str.splitlines` would also split on U+2028,
  U+2029, U+0085 and other separators that JSON allows raw inside strings, so one model answer holding one
  of them would break its line in two. A line that is not one JSON object is an error naming file:line.
- `write_atomic` / `write_jsonl_atomic`: a temp file beside the target, fsync, rename, fsync of the
  directory; readers see the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cai.errors import CaiError

YAML_MAX_BYTES = 1024 * 1024  # configs and constitutions are a few KiB; anything near this is a mistake or an attack
YAML_MAX_ALIASES = 100  # aliases are fine for sharing text, but many of them is how "billion laughs" starts
YAML_MAX_NODES = 20_000  # YAML values, also after expanding aliases; constitutions/default.yaml has about 200


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


def read_yaml_bytes(path: str | Path, what: str = "config", shown: str | None = None) -> bytes:
    """The bytes of a YAML file, at most YAML_MAX_BYTES (size checked before reading); a one-line CaiError else."""
    shown = shown or str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > YAML_MAX_BYTES:
                raise CaiError(f"{shown}: file is {size} bytes, over the {YAML_MAX_BYTES}-byte (1 MiB) limit "
                               f"for a {what} file; refusing to parse it")
            return f.read(YAML_MAX_BYTES + 1)
    except FileNotFoundError:
        raise CaiError(f"{shown}: {what} file not found") from None
    except IsADirectoryError:
        raise CaiError(f"{shown}: is a directory, expected a {what} YAML file") from None
    except OSError as e:
        raise CaiError(f"{shown}: cannot read: {e.strerror}") from None


def read_yaml_text(path: str | Path, what: str = "config", shown: str | None = None) -> str:
    """The text of a YAML file: at most YAML_MAX_BYTES of UTF-8; anything else is a one-line CaiError."""
    shown = shown or str(path)
    data = read_yaml_bytes(path, what, shown)
    if len(data) > YAML_MAX_BYTES:
        raise CaiError(f"{shown}: file is over the {YAML_MAX_BYTES}-byte (1 MiB) limit for a {what} file; "
                       f"refusing to parse it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaiError(f"{shown}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte offset {e.start})") from None


def read_yaml(path: str | Path, what: str = "config", shown: str | None = None) -> Any:
    """The data of a YAML file, read by `parse_yaml` (limits, no duplicate keys); None for an empty file."""
    shown = shown or str(path)
    text = read_yaml_text(path, what, shown)
    try:
        return parse_yaml(text, shown, f"a {what} file")[1]
    except RecursionError:
        raise CaiError(f"{shown}: nested too deeply to be a {what} file") from None


def yaml_field(path: tuple) -> str:
    """('critique_revision', 3, 'revision') -> 'critique_revision[3].revision'; () -> 'top level'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not re.fullmatch(r"[\w-]+", str(part)):  # keep odd keys (spaces, newlines) readable on one line
            out += f"[{str(part)!r}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "top level"


def yaml_where(name: str, node: Node | None) -> str:
    if node is None:
        return name
    return f"{name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def one_line(text: str) -> str:
    return " ".join(text.split())


class _Loader(yaml.SafeLoader):
    """SafeLoader that stops composing at YAML_MAX_ALIASES aliases or YAML_MAX_NODES values (pure-Python parsing of a
    dense 1 MiB file would otherwise take many seconds)."""

    def __init__(self, stream: str, name: str, what: str):
        super().__init__(stream)
        self.cai_name = name
        self.cai_what = what
        self.cai_aliases = 0
        self.cai_nodes = 0

    def compose_node(self, parent, index):
        self.cai_nodes += 1
        if self.cai_nodes > YAML_MAX_NODES:
            mark = self.peek_event().start_mark
            raise CaiError(f"{self.cai_name}:{mark.line + 1}:{mark.column + 1}: more than {YAML_MAX_NODES} YAML values; "
                           f"far too many for {self.cai_what}, refusing to parse further")
        if self.check_event(yaml.AliasEvent):
            self.cai_aliases += 1
            if self.cai_aliases > YAML_MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise CaiError(f"{self.cai_name}:{mark.line + 1}:{mark.column + 1}: more than {YAML_MAX_ALIASES} "
                               f"YAML aliases; {self.cai_what} does not need that many, refusing to expand them")
        return super().compose_node(parent, index)


def parse_yaml(text: str, name: str, what: str = "a config") -> tuple[Node | None, object]:
    """(node tree, data) of YAML text; `name` is the file as messages show it, `what` the kind of file ("a
    constitution"). The node tree is kept for line numbers; it is checked (aliases, size, duplicate keys)
    before the data is constructed."""
    loader = None
    try:
        loader = _Loader(text, name, what)  # the reader rejects control characters already here
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_expansion(root, name, what)
        check_duplicate_keys(root, name)
        return root, loader.construct_document(root)
    except yaml.MarkedYAMLError as e:
        raise CaiError(_yaml_error(e, name, what)) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise CaiError(f"{name}:{line}:{column}: YAML cannot contain the control character "
                       f"#x{e.character:04x}") from None
    except yaml.YAMLError as e:
        raise CaiError(f"{name}: YAML error: {one_line(str(e))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_error(e: yaml.MarkedYAMLError, name: str, what: str) -> str:
    """`file:line:col: YAML syntax error: problem (context at line L, column C)` on one line."""
    mark = e.problem_mark or e.context_mark
    where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
    kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
    text = e.problem or e.context or "unknown problem"
    if e.context and e.problem:
        c = e.context_mark
        same = c is None or (c.line, c.column) == (mark.line, mark.column)
        at = "" if same else f" at line {c.line + 1}, column {c.column + 1}"
        text += f" ({e.context}{at})"
    if "'\\t'" in text:
        text += "; indent with spaces, YAML does not allow tabs there"
    if isinstance(e, yaml.constructor.ConstructorError) and "tag" in text:
        text += f"; only plain YAML is allowed in {what}"
    return f"{where}: {kind}: {one_line(text)}"


def _check_expansion(root: Node, name: str, what: str) -> None:
    """Refuse recursive aliases and documents whose aliases expand to more than YAML_MAX_NODES nodes."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise CaiError(f"{yaml_where(name, node)}: this node contains an alias to itself; "
                           f"{what} cannot be a recursive structure")
        open_nodes.add(id(node))
        if isinstance(node, SequenceNode):
            n = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        open_nodes.discard(id(node))
        if n > YAML_MAX_NODES:
            raise CaiError(f"{yaml_where(name, node)}: this expands to more than {YAML_MAX_NODES} YAML values "
                           f"(counting each use of an alias); far too large for {what}, refusing it")
        sizes[id(node)] = n
        return n

    size(root)


def check_duplicate_keys(root: Node, name: str) -> None:
    """`yaml.safe_load` keeps the last of two equal keys without a word; here that is an error."""
    seen_nodes: set[int] = set()

    def walk(node: Node, path: tuple) -> None:
        if id(node) in seen_nodes:  # shared through an alias: already checked
            return
        seen_nodes.add(id(node))
        if isinstance(node, SequenceNode):
            for i, child in enumerate(node.value):
                walk(child, path + (i,))
        elif isinstance(node, MappingNode):
            first: dict[tuple[str, str], Node] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    earlier = first.setdefault((key.tag, key.value), key)
                    if earlier is not key:
                        raise CaiError(f"{yaml_where(name, key)}: {yaml_field(path + (key.value,))}: duplicate key "
                                       f"{key.value!r} (first at line {earlier.start_mark.line + 1}, "
                                       f"column {earlier.start_mark.column + 1}); "
                                       f"YAML would silently keep only the last one")
                walk(value, path + (key.value if isinstance(key, ScalarNode) else "?",))

    walk(root, ())



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
