"""Constitution loading, validation messages, and the `python -m cai.constitution` CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from cai.constitution import (
    MAX_ALIASES,
    MAX_BYTES,
    MAX_NODES,
    SCHEMA_PATH,
    Constitution,
    CritiqueRevision,
    load_constitution,
    main,
    principle_sha,
)
from cai.errors import CaiError
from cai.paths import PROJECT_ROOT

ASSETS = Path(__file__).parent / "assets" / "constitutions"
BAD = ASSETS / "bad"
GOOD = ASSETS / "good.yaml"

# Every file in bad/ must be listed here with substrings its message must contain: the position right after
# the file name (when the problem has one), the field path, and the gist. A vague message fails the test.
EXPECTED = {
    "syntax_unclosed_quote.yaml": [":12:1: YAML syntax error", "quoted scalar at line 7, column 15"],
    "syntax_bad_indentation.yaml": [":8:4: YAML syntax error", "expected <block end>"],
    "syntax_tab_indentation.yaml": [":7:1: YAML syntax error", "'\\t'", "tabs"],
    "top_level_list.yaml": [":2:1: expected a mapping at the top level", "got a list"],
    "top_level_scalar.yaml": [":2:1: expected a mapping at the top level", "got the string 'just some text'"],
    "empty.yaml": [": empty file", "expected a mapping with keys name, version"],
    "multiple_documents.yaml": [":3:1: YAML syntax error", "single document"],
    "missing_name.yaml": [":2:1: top level: missing required key 'name'"],
    "missing_feedback.yaml": [":2:1: top level: missing required key 'feedback'"],
    "missing_revision.yaml": [":9:5: critique_revision[1]: missing required key 'revision'", "id, critique, revision"],
    "version_float.yaml": [":3:10: version: expected a string, got a number", 'quote it: version: "1.10"'],
    "version_date.yaml": [":3:10: version: expected a string, got a date", 'version: "2024-05-01"'],
    "critique_list.yaml": [":8:7: critique_revision[0].critique: expected a non-empty string, got a list"],
    "id_int.yaml": [":10:9: feedback[0].id: expected an id", "got an integer (7)"],
    "revision_null.yaml": [":8:14: critique_revision[0].revision: expected a non-empty string, got null"],
    "feedback_mapping.yaml": [":10:3: feedback: expected a list, got a mapping"],
    "item_not_mapping.yaml": [":9:5: critique_revision[1]: expected a mapping, got the string"],
    "empty_critique_revision.yaml": [":5:20: critique_revision: expected a list with at least 1 item",
                                     "got an empty list"],
    "empty_critique.yaml": [":10:15: critique_revision[3].critique: expected a non-empty string, got an empty string"],
    "blank_question.yaml": [":11:15: feedback[0].question: expected a non-empty string, got a blank string"],
    "empty_name.yaml": [":2:7: name: expected a non-empty string, got an empty string"],
    "dup_id_critique_revision.yaml": [":12:9: critique_revision[2].id: duplicate id 'harm'", "critique_revision[0]"],
    "dup_id_feedback.yaml": [":12:9: feedback[1].id: duplicate id 'better'", "feedback[0]"],
    "unknown_top_key.yaml": [":5:1: author: unknown key 'author'", "expected only name, version"],
    "unknown_item_key.yaml": [":9:5: critique_revision[0].critque: unknown key 'critque'", "did you mean 'critique'?"],
    "misspelled_key.yaml": [":10:5: feedback[0]: missing required key 'question'", "'questoin' a misspelling"],
    "bad_id_pattern.yaml": [":6:9: critique_revision[0].id: expected an id", "'Harmful Content'"],
    "id_trailing_newline.yaml": [":6:9: critique_revision[0].id: expected an id", "'a\\n'"],
    "dup_mapping_key.yaml": [":9:1: description: duplicate key 'description' (first at line 4, column 1)"],
    "dup_mapping_key_item.yaml": [":12:5: critique_revision[1].revision: duplicate key 'revision'",
                                  "(first at line 11, column 5)"],
    "recursive_alias.yaml": [":5:20: ", "alias to itself"],
    "python_tag.yaml": [":2:7: YAML error", "python/object/apply", "only plain YAML"],
}


def assert_message(error: CaiError, path: Path | str, expected: list[str]) -> None:
    msg = str(error)
    assert msg.startswith(str(path) + ":"), msg
    assert "\n" not in msg, msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def load_error(path: Path | str) -> CaiError:
    with pytest.raises(CaiError) as info:
        load_constitution(path)
    return info.value


# ------------------------------------------------------------------------------------------ good files


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


def test_load_good():
    c = load_constitution(GOOD)
    assert isinstance(c, Constitution)
    assert (c.name, c.version) == ("test-good", "0.1")
    assert c.description == "A tiny constitution used by the test suite."
    assert [p.id for p in c.critique_revision] == ["harmful", "rude", "evasive_answer"]
    assert [p.id for p in c.feedback] == ["less-harmful", "more-honest"]
    assert isinstance(c.critique_revision, tuple) and isinstance(c.feedback, tuple)
    assert c.critique_revision[0] == CritiqueRevision(
        "harmful", "Point out any way the assistant's last reply could cause harm.",
        "Rewrite the assistant's reply so that it causes no harm.")
    # Folded (>-) and literal (|-) block scalars.
    assert c.critique_revision[2].critique.endswith("dodges the question instead of engaging with it.")
    assert c.critique_revision[2].revision == ("Rewrite the assistant's reply so that it engages with the question "
                                               "directly.")
    assert c.path == str(GOOD)
    assert c.sha == hashlib.sha256(GOOD.read_bytes()).hexdigest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.name = "other"  # type: ignore[misc]


def test_load_flow_style_with_alias():
    c = load_constitution(ASSETS / "good_flow.yaml")
    assert (c.name, c.version) == ("test-flow", "2")
    assert c.critique_revision[0].revision == c.critique_revision[1].revision == "Rewrite the reply without the harm."
    assert [p.question for p in c.feedback] == ["Which reply is safer?"]


def test_principle_sha():
    text = "Which of these replies is less harmful?"
    assert principle_sha(text) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert len(principle_sha(text)) == 16 and principle_sha(text) != principle_sha(text + " ")


def test_repo_constitutions():
    """The bundled constitutions must all load; default has 16 of each."""
    found = {p.name: p for p in sorted((PROJECT_ROOT / "constitutions").glob("*.yaml"))}
    assert {"default.yaml", "helpful_honest.yaml"} <= found.keys()
    loaded = {name: load_constitution(p) for name, p in found.items()}
    default = loaded["default.yaml"]
    assert (len(default.critique_revision), len(default.feedback)) == (16, 16)
    assert default.name == "default"


# ------------------------------------------------------------------------------------------- bad files


def test_every_bad_fixture_has_expectations():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(EXPECTED)
    assert len(EXPECTED) >= 22


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_fixture(name):
    path = BAD / name
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and len(first) > 12, "first line must say what is wrong"
    assert_message(load_error(path), path, EXPECTED[name])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert_message(load_error(path), path, ["constitution file not found"])


def test_directory(tmp_path):
    assert_message(load_error(tmp_path), tmp_path, ["is a directory"])


def test_not_utf8(tmp_path):
    data = GOOD.read_bytes()
    offset = data.index(b"A tiny")
    path = tmp_path / "latin1.yaml"
    path.write_bytes(data[:offset] + "Ä".encode("latin-1") + data[offset:])
    assert_message(load_error(path), path, ["not UTF-8", f"byte offset {offset}"])


def test_too_large_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    line = b"# " + b"x" * 1021 + b"\n"
    path.write_bytes(GOOD.read_bytes() + line * 1024)
    size = path.stat().st_size
    assert size > MAX_BYTES
    err = load_error(path)  # the message gives the size read from fstat: refused before parsing
    assert_message(err, path, [f"file is {size} bytes", f"{MAX_BYTES}-byte (1 MiB) limit"])


def test_too_many_aliases(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(GOOD.read_text() + "extra: &s x\nmore: [" + ", ".join(["*s"] * (MAX_ALIASES + 50)) + "]\n")
    err = load_error(path)
    assert_message(err, path, [f":{len(GOOD.read_text().splitlines()) + 2}:", f"more than {MAX_ALIASES} YAML aliases"])


def test_billion_laughs(tmp_path):
    """The classic bomb has only 90 aliases (9 levels of 10) but expands to 10**9 values."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text(GOOD.read_text() + "\n".join(lines) + "\n")
    err = load_error(path)
    assert_message(err, path, ["expands to more than", "alias"])


def test_deep_nesting(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("# deeply nested\nname: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_message(load_error(path), path, ["nested too deeply"])


def test_control_character(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_text("name: x\nversion: \"1\x00\"\n")
    assert_message(load_error(path), path, [":2:12:", "control character #x0000"])


# ----------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai.constitution", *map(str, args)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)


def test_cli_check_ok():
    r = run_cli("check", GOOD, ASSETS / "good_flow.yaml")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    sha = hashlib.sha256(GOOD.read_bytes()).hexdigest()[:16]
    assert lines[0] == f"ok  {GOOD}  name=test-good version=0.1  3 critique/revision, 2 feedback  sha={sha}"
    assert lines[1].startswith(f"ok  {ASSETS / 'good_flow.yaml'}  name=test-flow version=2  2 critique/revision")
    assert r.stderr == ""


def test_cli_check_stops_at_first_bad_file():
    bad = BAD / "empty_critique.yaml"
    r = run_cli("check", GOOD, bad, BAD / "empty.yaml")
    assert r.returncode == 2
    assert r.stdout.startswith(f"ok  {GOOD}") and len(r.stdout.splitlines()) == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:10:15: critique_revision[3].critique:"), r.stderr


def call_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_import_list_to_stdout(capsys):
    rc, out, err = call_main(capsys, "import", ASSETS / "import_list.json", "--feedback-from", GOOD)
    assert rc == 0, err
    assert out.startswith("# Imported from ")
    assert f"# feedback: copied from {GOOD}" in out
    doc = yaml.safe_load(out)
    assert doc["name"] == "import_list" and doc["version"] == "1.0"
    assert [p["id"] for p in doc["critique_revision"]] == ["cr-01", "tone", "be-honest", "cr-04"]
    assert doc["critique_revision"][1]["critique"] == "Say where the reply sounds cold or dismissive."
    assert doc["critique_revision"][2]["critique"] == "Say where the reply overstates what it knows."
    good = load_constitution(GOOD)
    assert doc["feedback"] == [{"id": f.id, "question": f.question} for f in good.feedback]
    assert "ignoring key(s) source" in err


def test_import_h4_round_trip_and_overwrite(tmp_path, capsys):
    out = tmp_path / "h4.yaml"
    rc, stdout, err = call_main(capsys, "import", ASSETS / "import_h4.json", "-o", out, "--name", "h4-harmless",
                                "--feedback-from", GOOD)
    assert rc == 0, err
    assert stdout == ""
    assert "system_chat" in err and f"wrote {out}" in err
    c = load_constitution(out)
    assert c.name == "h4-harmless"
    assert [p.id for p in c.critique_revision] == ["cr-01", "cr-02", "cr-03"]
    assert c.critique_revision[1].revision == "Rewrite the reply to be respectful to everyone."
    assert len(c.feedback) == 2
    r = run_cli("check", out)
    assert r.returncode == 0 and r.stdout.startswith(f"ok  {out}  name=h4-harmless"), r.stderr

    before = out.read_bytes()
    rc, _, err = call_main(capsys, "import", ASSETS / "import_list.json", "-o", out, "--feedback-from", GOOD)
    assert rc == 2 and err == f"error: {out}: already exists; pass --force to overwrite it\n"
    assert out.read_bytes() == before
    rc, _, err = call_main(capsys, "import", ASSETS / "import_list.json", "-o", out, "--feedback-from", GOOD, "--force")
    assert rc == 0, err
    assert load_constitution(out).name == "import_list"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h4.yaml"]  # no temporary file left behind


def test_import_default_feedback_from_any_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = call_main(capsys, "import", ASSETS / "import_h4.json")
    assert rc == 0, err
    assert "# feedback: copied from constitutions/default.yaml" in out
    assert len(yaml.safe_load(out)["feedback"]) == 16


def test_import_bad_json(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"critique": "a",\n    "revision": "b",,}\n]\n')
    rc, out, err = call_main(capsys, "import", path, "--feedback-from", GOOD)
    assert rc == 2 and out == ""
    assert err.startswith(f"error: {path}:3:21: invalid JSON: ") and err.count("\n") == 1


@pytest.mark.parametrize("content, expected", [
    ('[{"critique": "a"}]', "[0]: no key among revision, revision_request"),
    ('{"constitutions": [{"critic": "a", "revision": ""}]}', "constitutions[0].revision: expected a non-empty string"),
    ('[{"id": "x", "critique": "a", "revision": "b"}, {"id": "x", "critique": "c", "revision": "d"}]',
     "[1]: id 'x' is also the id of entry [0]"),
    ('{"system_chat": []}', "expected a JSON list of principles or an object with a 'constitutions' list"),
    ('[]', "expected at least one principle"),
    ('["just text"]', "[0]: expected an object with critique and revision keys"),
])
def test_import_bad_entries(tmp_path, capsys, content, expected):
    path = tmp_path / "in.json"
    path.write_text(content)
    rc, out, err = call_main(capsys, "import", path, "--feedback-from", GOOD)
    assert rc == 2 and out == ""
    assert err.startswith(f"error: {path}: ") and expected in err and err.count("\n") == 1, err


def test_too_many_values_stops_early(tmp_path):
    """A dense file under the size limit is refused by its value count (MAX_NODES), at the line where the count
    is passed (no timing here: the suite's speed goals are benchmarks, never timed tests)."""
    path = tmp_path / "dense.yaml"
    path.write_text(GOOD.read_text() + "dense: [" + ",".join(["1"] * (MAX_BYTES // 2 - 1000)) + "]\n")
    assert path.stat().st_size < MAX_BYTES
    err = load_error(path)
    assert_message(err, path, [f":{len(GOOD.read_text().splitlines()) + 1}:", f"more than {MAX_NODES} YAML values"])
