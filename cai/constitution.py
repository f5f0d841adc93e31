"""A constitution: the principles used for critique/revision (SL-CAI) and for AI feedback (RL-CAI).

It is a YAML file checked against `cai/schemas/constitution.schema.json`, plus what a schema cannot say:
ids unique within each list, no duplicate mapping keys (which `yaml.safe_load` would silently drop), and
bounds on size and on aliases so that a hostile file cannot hang the loader. Every problem becomes one
`CaiError` line that starts with the file, then the line and column where known, then the field path:

    constitutions/x.yaml:12:5: critique_revision[3].revision: expected a non-empty string, got an empty string

Command line:

    python -m cai.constitution check FILE [FILE ...]
    python -m cai.constitution import FILE.json [-o OUT.yaml] [--name NAME] [--feedback-from OTHER.yaml] [--force]
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cai.errors import CaiError, cli_main
from cai.io import YAML_MAX_ALIASES, YAML_MAX_BYTES, YAML_MAX_NODES, parse_yaml, read_yaml_bytes
from cai.io import yaml_field as _field
from cai.io import yaml_where as _where
from cai.paths import resolve_path

SCHEMA_PATH = Path(__file__).parent / "schemas" / "constitution.schema.json"
MAX_BYTES, MAX_ALIASES, MAX_NODES = YAML_MAX_BYTES, YAML_MAX_ALIASES, YAML_MAX_NODES  # cai.io's YAML limits
ID_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")
DEFAULT_FEEDBACK_FROM = "constitutions/default.yaml"


@dataclass(frozen=True)
class CritiqueRevision:
    id: str
    critique: str
    revision: str


@dataclass(frozen=True)
class FeedbackPrinciple:
    id: str
    question: str


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    description: str
    critique_revision: tuple[CritiqueRevision, ...]
    feedback: tuple[FeedbackPrinciple, ...]
    path: str  # as given by the user, for messages and records
    sha: str  # sha256 hex of the file's bytes


def principle_sha(text: str) -> str:
    """A short, stable fingerprint of one principle's text, used in record keys."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading


def load_constitution(path: str | os.PathLike) -> Constitution:
    """Read, parse and validate a constitution file; any problem is a one-line CaiError."""
    name = str(path)
    data = read_yaml_bytes(resolve_path(path), "constitution", name)
    return parse_constitution(data, name)


def parse_constitution(data: bytes, name: str) -> Constitution:
    """Validate the bytes of a constitution file; `name` is the file as it should appear in messages."""
    if len(data) > MAX_BYTES:
        raise CaiError(f"{name}: file is over the {MAX_BYTES}-byte (1 MiB) limit for a constitution; "
                       f"refusing to parse it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaiError(f"{name}: not UTF-8 text "
                       f"(invalid byte 0x{data[e.start]:02x} at byte offset {e.start})") from None
    try:
        root, doc = parse_yaml(text, name, "a constitution")
        if root is None:
            raise CaiError(f"{name}: empty file; expected a mapping with keys {_keys_of(_schema())}")
        if not isinstance(doc, dict):
            raise CaiError(f"{_where(name, root)}: expected a mapping at the top level with keys "
                           f"{_keys_of(_schema())}, got {_describe(doc)}")
        _validate(doc, root, name)
    except RecursionError:
        raise CaiError(f"{name}: nested too deeply to be a constitution") from None
    return Constitution(
        name=doc["name"],
        version=doc["version"],
        description=doc["description"],
        critique_revision=tuple(CritiqueRevision(i["id"], i["critique"], i["revision"])
                                for i in doc["critique_revision"]),
        feedback=tuple(FeedbackPrinciple(i["id"], i["question"]) for i in doc["feedback"]),
        path=name,
        sha=hashlib.sha256(data).hexdigest(),
    )


# ------------------------------------------------------------------------------------------- validation

_schema_cache: dict = {}
# When one node has several errors, report the most basic first.
_RANK = {"type": 0, "required": 1, "additionalProperties": 2, "minItems": 3, "minLength": 4, "pattern": 5}


def _schema() -> dict:
    if not _schema_cache:
        _schema_cache["schema"] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return _schema_cache["schema"]


def _validate(doc: dict, root: Node, name: str) -> None:
    """Report the first schema error in file order, then the first duplicate id."""
    validator = jsonschema.Draft202012Validator(_schema())
    errors = []
    for error in validator.iter_errors(doc):
        path = tuple(error.absolute_path)
        node = _node_at(root, path)
        if error.validator == "additionalProperties" and isinstance(node, MappingNode):
            # Point at the first unknown key in the file (keys like `null:` or `1:` are not strings in the data).
            known = error.schema.get("properties", {})
            node = next((k for k, _ in node.value if not (isinstance(k, ScalarNode) and k.value in known)), node)
        errors.append((_pos(node), _RANK.get(error.validator, 9), _field(path), error, node))
    if errors:
        _, _, _, error, node = min(errors, key=lambda e: e[:3])
        raise CaiError(f"{_where(name, node)}: {_explain(error, node)}")

    for list_name in ("critique_revision", "feedback"):
        first: dict[str, int] = {}
        for i, item in enumerate(doc[list_name]):
            path = (list_name, i, "id")
            node = _node_at(root, path)
            if not ID_PATTERN.fullmatch(item["id"]):  # the schema's `$` also accepts a trailing newline
                raise CaiError(f"{_where(name, node)}: {_field(path)}: expected an id of lowercase letters, "
                               f"digits, '-' and '_' starting with a letter, got {_describe(item['id'])}")
            j = first.setdefault(item["id"], i)
            if j != i:
                raise CaiError(f"{_where(name, node)}: {_field(path)}: duplicate id {item['id']!r}, also used by "
                               f"{list_name}[{j}]; ids must be unique within {list_name}")


def _explain(error: jsonschema.ValidationError, node: Node | None) -> str:
    """'field: what is wrong; what was expected' for one schema error."""
    path = tuple(error.absolute_path)
    field, schema, value = _field(path), error.schema, error.instance
    if error.validator == "required":
        missing = [k for k in schema["required"] if k not in value][0]
        unknown = [str(k) for k in value if k not in schema["properties"]]
        typo = difflib.get_close_matches(missing, unknown, n=1)
        hint = f" (is {typo[0]!r} a misspelling of it?)" if typo else ""
        return f"{field}: missing required key {missing!r}{hint}; expected keys {_keys_of(schema)}"
    if error.validator == "additionalProperties":
        # `node` is the first unknown key in the file when it could be found.
        extra = node.value if isinstance(node, ScalarNode) else next(k for k in value if k not in schema["properties"])
        extra = str(extra) if isinstance(node, ScalarNode) or isinstance(extra, str) else repr(extra)
        close = difflib.get_close_matches(extra, list(schema["properties"]), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{_field(path + (extra,))}: unknown key {extra!r}; expected only {_keys_of(schema)}{hint}"
    if error.validator == "minItems":
        return f"{field}: expected a list with at least {schema['minItems']} item, got an empty list"
    found = _describe(value)
    if error.validator == "type" and path == ("version",) and isinstance(node, ScalarNode):
        # YAML reads 1.0 as a float and 2024-01-01 as a date; the text as written is what was meant.
        return (f"{field}: expected a string, got {found}; quote it: version: \"{node.value}\"")
    return f"{field}: expected {_expected(schema)}, got {found}"


def _expected(schema: dict) -> str:
    if schema.get("pattern") == r"\S":
        return "a non-empty string"
    if "pattern" in schema:
        return "an id of lowercase letters, digits, '-' and '_' starting with a letter (" + schema["pattern"] + ")"
    return {"object": "a mapping", "array": "a list", "string": "a string"}.get(schema.get("type"), "a valid value")


def _describe(value: object) -> str:
    """What was found, in YAML words."""
    if value is None:
        return "null (no value)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        if not value:
            return "an empty string"
        if not value.strip():
            return "a blank string (only whitespace)"
        return f"the string {value[:60]!r}" + ("..." if len(value) > 60 else "")
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"a date ({value})"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bytes):
        return "binary data (!!binary)"
    if isinstance(value, set):
        return "a set (!!set)"
    return f"a YAML {type(value).__name__}"


def _keys_of(schema: dict) -> str:
    return ", ".join(schema["properties"])




def _node_at(root: Node, path: tuple) -> Node:
    """The node at a data path, or the deepest node found on the way (for a line number)."""
    node = root
    for part in path:
        if isinstance(node, MappingNode):
            value = next((v for k, v in node.value if isinstance(k, ScalarNode) and k.value == str(part)), None)
        elif isinstance(node, SequenceNode) and isinstance(part, int) and part < len(node.value):
            value = node.value[part]
        else:
            value = None
        if value is None:
            return node
        node = value
    return node


def _pos(node: Node | None) -> tuple[int, int]:
    return (node.start_mark.line, node.start_mark.column) if node is not None else (0, 0)






# ----------------------------------------------------------------------------------------------- import


def import_json(path: str, name: str | None, feedback_from: str) -> tuple[str, list[str]]:
    """Convert the JSON form public CAI datasets ship into our YAML text; also return notes for stderr."""
    items, notes = _read_import_json(path)
    feedback = load_constitution(feedback_from)
    principles, first_by_id = [], {}
    for i, (where, item) in enumerate(items):
        critique = _pick(item, ("critique", "critic", "critique_request"), path, where)
        revision = _pick(item, ("revision", "revision_request"), path, where)
        pid = _import_id(item.get("id", item.get("name")), i, len(items))
        j = first_by_id.setdefault(pid, i)
        if j != i:
            raise CaiError(f"{path}: {where}: id {pid!r} is also the id of entry {items[j][0]}; "
                           f"ids must be unique, rename one")
        principles.append({"id": pid, "critique": critique, "revision": revision})
        unused = sorted(set(item) - {"id", "name", "critique", "critic", "critique_request",
                                     "revision", "revision_request"})
        if unused:
            notes.append(f"{path}: {where}: ignoring key(s) {', '.join(unused)}")
    stem_id = _import_id(Path(path).stem, 0, 1)
    doc = {
        "name": name or stem_id,
        "version": "1.0",
        "description": f"Imported from {Path(path).name}: {len(principles)} critique/revision principles; "
                       f"feedback principles copied from {feedback_from}.",
        "critique_revision": principles,
        "feedback": [{"id": f.id, "question": f.question} for f in feedback.feedback],
    }
    header = (f"# Imported from {path} by `python -m cai.constitution import`.\n"
              f"# critique_revision: {len(principles)} entries from that file (ids cr-NN generated where absent).\n"
              f"# feedback: copied from {feedback_from} (the JSON form has no feedback principles).\n")
    return header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100), notes


def _read_import_json(path: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """The entries of a JSON list, or of the `constitutions` list of an object, each with its position."""
    p = resolve_path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CaiError(f"{path}: JSON file not found") from None
    except OSError as e:
        raise CaiError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_BYTES:
        raise CaiError(f"{path}: file is {len(data)} bytes, over the {MAX_BYTES}-byte (1 MiB) limit")
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CaiError(f"{path}: not UTF-8 text (invalid byte at byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise CaiError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    notes, prefix = [], ""
    if isinstance(value, dict) and isinstance(value.get("constitutions"), list):
        extra = [k for k in value if k != "constitutions"]
        if extra:
            notes.append(f"{path}: ignoring top-level key(s) {', '.join(extra)}; only 'constitutions' is imported")
        value, prefix = value["constitutions"], "constitutions"
    if not isinstance(value, list):
        raise CaiError(f"{path}: expected a JSON list of principles or an object with a 'constitutions' list, "
                       f"got {_describe(value)}")
    if not value:
        raise CaiError(f"{path}: {prefix or 'top level'}: expected at least one principle, got an empty list")
    entries = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise CaiError(f"{path}: {prefix}[{i}]: expected an object with critique and revision keys, "
                           f"got {_describe(item)}")
        entries.append((f"{prefix}[{i}]", item))
    return entries, notes


def _pick(item: dict, keys: tuple[str, ...], path: str, where: str) -> str:
    key = next((k for k in keys if k in item), None)
    if key is None:
        raise CaiError(f"{path}: {where}: no key among {', '.join(keys)}; found keys {', '.join(item) or 'none'}")
    if not isinstance(item[key], str) or not item[key].strip():
        raise CaiError(f"{path}: {where}.{key}: expected a non-empty string, got {_describe(item[key])}")
    return item[key]


def _import_id(given: object, index: int, count: int) -> str:
    """A given id or name made to fit the id pattern, else cr-01, cr-02, ..."""
    if given is not None:
        slug = re.sub(r"[^a-z0-9_-]+", "-", str(given).strip().lower()).strip("-_")
        if slug:
            return slug if slug[0].isalpha() else f"cr-{slug}"
    return f"cr-{index + 1:0{max(2, len(str(count)))}d}"


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- command


def _cmd_check(args: argparse.Namespace) -> int:
    for path in args.files:
        c = load_constitution(path)
        print(f"ok  {path}  name={c.name} version={c.version}  {len(c.critique_revision)} critique/revision, "
              f"{len(c.feedback)} feedback  sha={c.sha[:16]}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else None
    if out is not None:
        if out.is_dir():
            raise CaiError(f"{out}: is a directory, expected an output file path")
        if out.exists() and not args.force:
            raise CaiError(f"{out}: already exists; pass --force to overwrite it")
        if not out.parent.is_dir():
            raise CaiError(f"{out}: directory {out.parent} does not exist")
    text, notes = import_json(args.file, args.name, args.feedback_from)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    c = parse_constitution(text.encode("utf-8"), str(out or "<stdout>"))  # what we write must pass `check`
    if out is None:
        sys.stdout.write(text)
    else:
        _write_atomic(out, text)
        print(f"wrote {out}: {len(c.critique_revision)} critique/revision, {len(c.feedback)} feedback",
              file=sys.stderr)
    return 0


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cai.constitution", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate constitution files; exit 2 on the first bad one")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(run=_cmd_check)
    imp = sub.add_parser("import", help="convert a public CAI dataset's JSON principles into our YAML")
    imp.add_argument("file", metavar="FILE.json")
    imp.add_argument("-o", "--output", metavar="OUT.yaml", help="write here (atomically) instead of stdout")
    imp.add_argument("--name", help="constitution name (default: from the JSON file name)")
    imp.add_argument("--feedback-from", default=DEFAULT_FEEDBACK_FROM, metavar="OTHER.yaml",
                     help=f"copy the feedback principles from this constitution (default: {DEFAULT_FEEDBACK_FROM})")
    imp.add_argument("--force", action="store_true", help="overwrite an existing output file")
    imp.set_defaults(run=_cmd_import)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
