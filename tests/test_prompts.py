"""Prompt sets (shipped and user files) and few-shot demonstrations."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import yaml

from cai.config import PromptSource
from cai.errors import CaiError
from cai.paths import PROJECT_ROOT
from cai.prompts import FEW_SHOT_KEYS, PromptRecord, load_few_shot, load_prompts

SETS = PROJECT_ROOT / "prompts" / "sets"
FEW_SHOT = PROJECT_ROOT / "prompts" / "few_shot" / "critique_revision.yaml"


def src(path, **kw) -> PromptSource:
    return PromptSource(path=str(path), **kw)


@pytest.fixture(scope="module")
def shipped():
    return {name: load_prompts(src(SETS / f"{name}.jsonl"))
            for name in ("red_team_train", "red_team_eval", "helpful_train", "helpful_eval")}


@pytest.mark.parametrize("name,minimum", [("red_team_train", 200), ("red_team_eval", 50),
                                          ("helpful_train", 200), ("helpful_eval", 50)])
def test_shipped_set_sizes(shipped, name, minimum):
    assert len(shipped[name]) >= minimum
    assert all(isinstance(r, PromptRecord) and r.prompt.strip() and r.category for r in shipped[name])


def test_shipped_ids_unique_across_all_sets(shipped):
    ids = [r.id for records in shipped.values() for r in records]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("kind", ["red_team", "helpful"])
def test_no_prompt_shared_between_train_and_eval(shipped, kind):
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    train = {norm(r.prompt) for r in shipped[f"{kind}_train"]}
    evals = {norm(r.prompt) for r in shipped[f"{kind}_eval"]}
    assert not train & evals
    assert len(train) == len(shipped[f"{kind}_train"])  # no duplicate prompts within a set either


def test_shipped_set_loads_by_relative_path():
    records = load_prompts(src("prompts/sets/red_team_eval.jsonl", limit=2))
    assert [r.id for r in records] == ["rt-eval-0001", "rt-eval-0002"]
    assert records[0].category == "dangerous_advice"


def test_csv_with_custom_column_and_no_id(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('question,topic\n"How, exactly, do magnets work?",science\nWhy is the sky blue?,science\n'
                    "Tell me a joke,fun\n", encoding="utf-8")
    records = load_prompts(src(path, column="question", category_column="topic"))
    assert records == [PromptRecord("row-0", "How, exactly, do magnets work?", "science"),
                       PromptRecord("row-1", "Why is the sky blue?", "science"),
                       PromptRecord("row-2", "Tell me a joke", "fun")]


def test_parquet_with_custom_column_and_no_id(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question": ["first?", "second?"], "extra": [1, 2]}), path)
    records = load_prompts(src(path, column="question"))
    assert records == [PromptRecord("row-0", "first?", ""), PromptRecord("row-1", "second?", "")]


def test_integer_id_column_becomes_string(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("id,prompt\n7,seven\n3,three\n", encoding="utf-8")
    assert [(r.id, r.prompt) for r in load_prompts(src(path))] == [("7", "seven"), ("3", "three")]


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,topic\nhi,x\n", encoding="utf-8")
    with pytest.raises(CaiError) as e:
        load_prompts(src(path))  # column defaults to "prompt"
    assert "no column 'prompt'" in str(e.value)
    assert "['question', 'topic']" in str(e.value)


def test_broken_jsonl_line_gives_path_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": \n{"id": "c", "prompt": "z"}\n',
                    encoding="utf-8")
    with pytest.raises(CaiError, match=rf"^{path}:3: invalid JSON"):
        load_prompts(src(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n["b"]\n', encoding="utf-8")
    with pytest.raises(CaiError, match=rf"^{path}:2: expected a JSON object per line, got list"):
        load_prompts(src(path))


def test_duplicate_ids_are_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}, {"id": "a", "prompt": "three"}]))
    with pytest.raises(CaiError, match=r"row 3: duplicate id 'a' \(first at row 1\)"):
        load_prompts(src(path))


def test_empty_prompt_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "  "}\n')
    with pytest.raises(CaiError, match="row 2: 'prompt' must be a non-empty string"):
        load_prompts(src(path))


def test_limit(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}"}) + "\n" for i in range(5)))
    assert [r.id for r in load_prompts(src(path, limit=2))] == ["p0", "p1"]
    assert len(load_prompts(src(path, limit=0))) == 0
    assert len(load_prompts(src(path, limit=99))) == 5
    assert len(load_prompts(src(path))) == 5


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(CaiError, match="prompt file not found"):
        load_prompts(src(tmp_path / "absent.jsonl"))
    (tmp_path / "p.txt").write_text("hello\n")
    with pytest.raises(CaiError, match="unsupported prompt file type '.txt'"):
        load_prompts(src(tmp_path / "p.txt"))


# -- few-shot demonstrations --------------------------------------------------------------------------

def demo(**over):
    return {**{k: f"{k} text" for k in FEW_SHOT_KEYS}, **over}


def test_few_shot_count_zero_reads_nothing(tmp_path):
    assert load_few_shot(tmp_path / "does_not_exist.yaml", 0) == []


def test_few_shot_shipped_file():
    shipped = yaml.safe_load(FEW_SHOT.read_text(encoding="utf-8"))
    got = load_few_shot("prompts/few_shot/critique_revision.yaml", 2)
    assert got == shipped[:2]
    assert all(set(d) == set(FEW_SHOT_KEYS) for d in got)


def test_few_shot_count_larger_than_file(tmp_path):
    path = tmp_path / "fs.yaml"
    path.write_text(yaml.safe_dump([demo(), demo()]))
    assert len(load_few_shot(path, 2)) == 2
    with pytest.raises(CaiError, match="critique.few_shot=3 but the file has only 2 demonstrations"):
        load_few_shot(path, 3)


def test_few_shot_missing_key_names_the_index(tmp_path):
    path = tmp_path / "fs.yaml"
    broken = demo()
    del broken["critique"]
    path.write_text(yaml.safe_dump([demo(), broken]))
    with pytest.raises(CaiError) as e:
        load_few_shot(path, 1)  # every demonstration is checked, not just the first `count`
    assert f"{path}: [1]: expected keys" in str(e.value)
    assert "'critique'" in str(e.value)


def test_few_shot_blank_value_names_index_and_key(tmp_path):
    path = tmp_path / "fs.yaml"
    path.write_text(yaml.safe_dump([demo(revision="   ")]))
    with pytest.raises(CaiError, match=r"\[0\]\.revision: expected a non-empty string"):
        load_few_shot(path, 1)


def test_few_shot_not_a_list(tmp_path):
    path = tmp_path / "fs.yaml"
    path.write_text(yaml.safe_dump(demo()))
    with pytest.raises(CaiError, match="expected a list of demonstrations, got dict"):
        load_few_shot(path, 1)
