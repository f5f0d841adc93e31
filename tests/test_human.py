"""Human feedback import: comparisons (JSONL/CSV), rankings, demonstrations, error lines, mixing with AI labels."""

import json

import pytest

from cai.config import stable_hash
from cai.errors import CaiError
from cai.feedback import label_diagnostics
from cai.human import load_demonstrations, load_human_comparisons, load_human_rankings, merge_sources
from cai.records import pair_identity

from .conftest import ASSETS, ROOT

HUMAN = ASSETS / "human"
SHAPE = {"key", "pair_key", "prompt_id", "prompt", "category", "answer_a", "answer_b", "source", "annotator",
         "soft_label", "agree", "principles", "cot"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "p", "answer_a": "x", "answer_b": "y", "choice": "a"}


# --- comparisons --------------------------------------------------------------------------------------------


def test_jsonl_comparisons(tmp_path):
    f = write_jsonl(tmp_path / "h.jsonl", [
        {"prompt": "Q", "answer_a": "good", "answer_b": "bad", "choice": "A", "annotator": "ann-1", "prompt_id": "help-1"},
        "",
        {"prompt": "Q", "answer_a": "bad", "answer_b": "good", "choice": "b", "annotator": "ann-2"},
        {"prompt": "Q", "answer_a": "good", "answer_b": "bad", "probability": 0.7},
        {"prompt": "Q", "answer_a": "good", "answer_b": "bad", "choice": "tie", "annotator": "ann-1"},
        {"prompt": "Q", "answer_a": "good", "answer_b": "bad", "probability": 1, "category": "helpful"},
    ])
    recs = load_human_comparisons(f)
    assert [r["soft_label"] for r in recs] == [1.0, 0.0, 0.7, 0.5, 1.0]
    assert [r["annotator"] for r in recs] == ["ann-1", "ann-2", "anonymous", "ann-1", "anonymous"]
    r = recs[0]
    assert set(r) == SHAPE
    assert (r["source"], r["agree"], r["principles"], r["cot"], r["prompt_id"]) == ("human", None, [], False, "help-1")
    assert (r["prompt"], r["answer_a"], r["answer_b"], r["category"]) == ("Q", "good", "bad", "")
    assert recs[4]["category"] == "helpful"
    # no prompt_id: a stable one from the prompt text
    assert recs[1]["prompt_id"] == "human-" + stable_hash({"prompt": "Q"}, 12)
    # one pair whatever the order; one record per annotator and label
    assert len({x["pair_key"] for x in recs}) == 1
    assert len({x["key"] for x in recs}) == 5
    assert load_human_comparisons(f) == recs  # deterministic


def test_csv_comparisons():
    recs = load_human_comparisons(HUMAN / "labels.csv")
    assert [(r["prompt_id"], r["answer_a"], r["answer_b"], r["soft_label"], r["annotator"]) for r in recs] == [
        ("help-x-1", "4", "5", 1.0, "ann-1"),
        ("help-x-1", "5", "4", 0.25, "ann-2"),
        ("human-" + stable_hash({"prompt": "Say hi, twice."}, 12), "hi, hi", "hello\nhello", 0.5, "anonymous"),
    ]
    assert recs[0]["pair_key"] == recs[1]["pair_key"] != recs[2]["pair_key"]
    assert all(set(r) == SHAPE and r["source"] == "human" for r in recs)


def test_csv_with_bom_and_crlf(tmp_path):
    f = tmp_path / "h.csv"
    f.write_bytes("\ufeffprompt,answer_a,answer_b,choice\r\nq,x,y,B\r\n".encode())
    [r] = load_human_comparisons(f)
    assert (r["prompt"], r["soft_label"]) == ("q", 0.0)


def row(**kw):
    r = dict(GOOD)
    for k, v in kw.items():
        if v is None:
            r.pop(k)
        else:
            r[k] = v
    return r


JSONL_BAD = [
    ("not json", '{"prompt": "p",', ":2: invalid JSON"),
    ("not an object", "[1, 2]", ":2: expected a JSON object"),
    ("missing prompt", row(prompt=None), ":2: prompt: expected a non-empty string"),
    ("empty answer_b", row(answer_b="  "), ":2: answer_b: expected a non-empty string"),
    ("answer_a number", row(answer_a=3), ":2: answer_a: expected a non-empty string"),
    ("empty annotator", row(annotator=""), ":2: annotator: expected a non-empty string"),
    ("both", row(probability=0.5), ":2: choice/probability: expected exactly one"),
    ("neither", row(choice=None), ":2: choice/probability: expected exactly one"),
    ("bad choice", row(choice="c"), ":2: choice: expected one of a, b, A, B, tie"),
    ("choice Tie", row(choice="TIE"), ":2: choice: expected one of"),
    ("prob > 1", row(choice=None, probability=1.5), ":2: probability: expected a number from 0 to 1"),
    ("prob < 0", row(choice=None, probability=-0.1), ":2: probability: expected a number from 0 to 1"),
    ("prob string", row(choice=None, probability="0.5"), ":2: probability: expected a number"),
    ("prob bool", row(choice=None, probability=True), ":2: probability: expected a number"),
    ("identical", row(answer_b="x"), ":2: answer_b: expected a different answer"),
    ("unknown field", row(chioce="a"), ":2: unknown field 'chioce'"),
    ("duplicate", row(), ":2: duplicate of line 1"),
]


@pytest.mark.parametrize("bad,expected", [c[1:] for c in JSONL_BAD], ids=[c[0] for c in JSONL_BAD])
def test_bad_jsonl_rows(tmp_path, bad, expected):
    f = write_jsonl(tmp_path / "h.jsonl", [GOOD, bad])
    with pytest.raises(CaiError) as e:
        load_human_comparisons(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}{expected}"), msg
    assert "\n" not in msg


CSV_BAD = [  # rows after the header "prompt,answer_a,answer_b,choice,probability"; the bad record is on line 3
    ("missing answer_b", "p,x,,a,", ":3: answer_b: expected a non-empty string"),
    ("both", "p,x,y,a,0.5", ":3: choice/probability: expected exactly one"),
    ("neither", "p,x,y,,", ":3: choice/probability: expected exactly one"),
    ("bad choice", "p,x,y,yes,", ":3: choice: expected one of"),
    ("prob text", "p,x,y,,high", ":3: probability: expected a number from 0 to 1, got 'high'"),
    ("prob nan", "p,x,y,,nan", ":3: probability: expected a number"),
    ("prob range", "p,x,y,,2", ":3: probability: expected a number from 0 to 1, got 2.0"),
    ("identical", "p,x,x,a,", ":3: answer_b: expected a different answer"),
    ("field count", "p,x,y,a", ":3: expected 5 fields as in the header, got 4"),
]


@pytest.mark.parametrize("bad,expected", [c[1:] for c in CSV_BAD], ids=[c[0] for c in CSV_BAD])
def test_bad_csv_rows(tmp_path, bad, expected):
    f = tmp_path / "h.csv"
    f.write_text(f"prompt,answer_a,answer_b,choice,probability\nq,a,b,b,\n{bad}\n")
    with pytest.raises(CaiError) as e:
        load_human_comparisons(f)
    assert str(e.value).startswith(f"{f}{expected}"), str(e.value)


def test_csv_line_numbers_count_multiline_records(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text('prompt,answer_a,answer_b,choice\n"two\nlines",a,b,a\n\nq,a,b,maybe\n')
    with pytest.raises(CaiError, match=r"h\.csv:5: choice"):
        load_human_comparisons(f)


@pytest.mark.parametrize("name,content,expected", [
    ("missing.jsonl", None, ": no such file"),
    ("h.txt", b"{}", ": expected a .jsonl or .csv file"),
    ("h.jsonl", b'{"prompt": "p"}\n{"prompt": "caf\xe9"}\n', ":2: not UTF-8 text"),
    ("h.csv", b"prompt,answer_a,answer_b,choice\nq,\xff,b,a\n", ":2: not UTF-8 text"),
    ("h.jsonl", b"\n\n", ": no rows"),
    ("h.csv", b"", ": empty file"),
    ("h.csv", b"prompt,prompt,answer_a\n", ":1: column 'prompt' appears twice"),
    ("h.csv", b"prompt,answer_a,answer_b,choise\n", ":1: unknown column 'choise'"),
    ("h.csv", b'prompt,answer_a,answer_b,choice\nq,a,b,a\nq,"open,b,a\nq,a,b,a\n', ":3: invalid CSV"),
])
def test_bad_files(tmp_path, name, content, expected):
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(CaiError) as e:
        load_human_comparisons(f)
    assert str(e.value).startswith(f"{f}{expected}"), str(e.value)


# --- rankings -----------------------------------------------------------------------------------------------


def test_rankings_k4(tmp_path):
    ranking = ["best", "second", "third", "worst"]
    f = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q", "ranking": ranking, "annotator": "ann-1", "prompt_id": "help-9"}])
    recs = load_human_rankings(f)
    assert len(recs) == 6
    assert all(set(r) == SHAPE | {"ranking_size"} and r["ranking_size"] == 4 for r in recs)
    assert all(r["source"] == "human" and r["annotator"] == "ann-1" and r["prompt_id"] == "help-9" for r in recs)
    seen = set()
    for r in recs:
        assert r["soft_label"] in (0.0, 1.0)
        preferred, other = (r["answer_a"], r["answer_b"]) if r["soft_label"] == 1.0 else (r["answer_b"], r["answer_a"])
        assert ranking.index(preferred) < ranking.index(other)
        seen.add(frozenset([preferred, other]))
    assert len(seen) == 6
    assert len({r["key"] for r in recs}) == 6
    # the position of the better answer follows a hash, not the ranking: both positions occur here
    assert {r["soft_label"] for r in recs} == {0.0, 1.0}
    assert load_human_rankings(f) == recs
    # a pair's position does not depend on where else it was ranked
    g = write_jsonl(tmp_path / "r2.jsonl", [{"prompt": "Q", "ranking": ["second", "worst"], "annotator": "ann-1"}])
    [one] = load_human_rankings(g)
    match = next(r for r in recs if pair_identity(r) == pair_identity(one))
    assert (one["answer_a"], one["soft_label"]) == (match["answer_a"], match["soft_label"])


@pytest.mark.parametrize("bad,expected", [
    ({"prompt": "p", "ranking": ["only"]}, ":2: ranking: expected a list of 2 to 9 non-empty strings, best first, got 1"),
    ({"prompt": "p", "ranking": [str(i) for i in range(10)]}, ":2: ranking: expected a list of 2 to 9"),
    ({"prompt": "p", "ranking": "a, b"}, ":2: ranking: expected a list"),
    ({"prompt": "p"}, ":2: ranking: expected a list of 2 to 9 non-empty strings, best first, got nothing"),
    ({"prompt": "p", "ranking": ["a", "b", "a"]}, ":2: ranking[2]: expected distinct answers, same as ranking[0]"),
    ({"prompt": "p", "ranking": ["a", ""]}, ":2: ranking[1]: expected a non-empty string"),
    ({"ranking": ["a", "b"]}, ":2: prompt: expected a non-empty string"),
    ({"prompt": "p", "ranking": ["a", "b"], "choice": "a"}, ":2: unknown field 'choice'"),
])
def test_bad_rankings(tmp_path, bad, expected):
    f = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "ranking": ["a", "b"]}, bad])
    with pytest.raises(CaiError) as e:
        load_human_rankings(f)
    assert str(e.value).startswith(f"{f}{expected}"), str(e.value)


def test_rankings_are_jsonl_only(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("prompt,ranking\n")
    with pytest.raises(CaiError, match=r"r\.csv: expected a \.jsonl file"):
        load_human_rankings(f)


# --- demonstrations -----------------------------------------------------------------------------------------


def test_demonstrations_jsonl_and_csv(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "answer": "A", "annotator": "ann-1", "prompt_id": "rt-1"},
                                           {"prompt": "Q2", "answer": "A2"}])
    recs = load_demonstrations(f)
    assert recs[0] == {"key": recs[0]["key"], "source": "human", "prompt_id": "rt-1", "round": 0, "annotator": "ann-1",
                       "prompt": [{"role": "user", "content": "Q"}],
                       "completion": [{"role": "assistant", "content": "A"}]}
    assert recs[1]["annotator"] == "anonymous" and recs[0]["key"] != recs[1]["key"]
    csv_recs = load_demonstrations(HUMAN / "demos.csv")
    assert [(r["prompt"][0]["content"], r["completion"][0]["content"], r["annotator"]) for r in csv_recs] == [
        ("What is 2+2?", "4", "ann-1"), ("Write two lines.", "line one\nline two", "anonymous")]


@pytest.mark.parametrize("name,content,expected", [
    ("d.jsonl", '{"prompt": "p", "answer": "a"}\n{"prompt": "p"}\n', ":2: answer: expected a non-empty string"),
    ("d.jsonl", '{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "a"}\n', ":2: duplicate of line 1"),
    ("d.jsonl", '{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "b"\n', ":2: invalid JSON"),
    ("d.csv", "prompt,answer\np,a\n,b\n", ":3: prompt: expected a non-empty string"),
    ("d.csv", 'prompt,answer\n"p\n\nq",a\nr,\n', ":5: answer: expected a non-empty string"),
])
def test_bad_demonstrations(tmp_path, name, content, expected):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CaiError) as e:
        load_demonstrations(f)
    assert str(e.value).startswith(f"{f}{expected}"), str(e.value)


# --- merging ------------------------------------------------------------------------------------------------


def ai(name, prompt, a, b, category, prompt_id):
    return {"key": name, "pair_key": "pk-" + name, "prompt_id": prompt_id, "prompt": prompt, "category": category,
            "answer_a": a, "answer_b": b, "source": "ai", "annotator": "labeler", "soft_label": 0.6, "agree": True,
            "principles": [{"id": "x"}], "cot": False}


def hum(name, prompt, a, b, annotator, prompt_id="human-x", category=""):
    return {"key": name, "pair_key": "hp", "prompt_id": prompt_id, "prompt": prompt, "category": category,
            "answer_a": a, "answer_b": b, "source": "human", "annotator": annotator, "soft_label": 1.0,
            "agree": None, "principles": [], "cot": False}


AI = [
    ai("ai-help1", "cook?", "c1", "c2", "cooking", "help-train-0001"),  # human-labelled (both annotators, swapped)
    ai("ai-help2", "bake?", "b1", "b2", "cooking", "help-train-0002"),  # helpful, no human label
    ai("ai-harm1", "hotel?", "h1", "h2", "theft", "rt-train-0002"),  # harmful, human-labelled
    ai("ai-harm2", "gun?", "g1", "g2", "weapons", "rt-train-0001"),  # harmful, no human label
    ai("ai-cat", "tea?", "t1", "t2", "helpful", "x-1"),  # helpful by category
]
HUMAN_RECS = [
    hum("h-help1-ann1", "cook?", "c2", "c1", "ann-1"),
    hum("h-harm1", "hotel?", "h1", "h2", "ann-1"),
    hum("h-help1-ann2", "cook?", "c1", "c2", "ann-2"),
    hum("h-other-help", "soup?", "s1", "s2", "ann-1", prompt_id="help-train-0099"),  # no AI pair, helpful
    hum("h-other-harm", "knife?", "k1", "k2", "ann-2", prompt_id="rt-train-0099"),  # no AI pair, harmful
    hum("h-cat", "tea?", "t2", "t1", "ann-2"),
    hum("h-cat-only", "nap?", "n1", "n2", "ann-2", category="helpful"),  # no AI pair, helpful by category
    hum("h-prompt-diff", "cook!", "c1", "c2", "ann-1", prompt_id="rt-train-0100"),  # same answers, other prompt
]


def test_merge_human_first():
    snapshot = json.dumps([AI, HUMAN_RECS])
    out = merge_sources(AI, HUMAN_RECS, "human_first")
    assert [r["key"] for r in out] == [
        "h-help1-ann1", "h-help1-ann2", "ai-help2", "h-harm1", "ai-harm2", "h-cat",
        "h-other-help", "h-other-harm", "h-cat-only", "h-prompt-diff"]
    assert json.dumps([AI, HUMAN_RECS]) == snapshot  # inputs untouched
    out[0]["soft_label"] = -1
    assert HUMAN_RECS[0]["soft_label"] == 1.0  # new dicts


def test_merge_by_category():
    out = merge_sources(AI, HUMAN_RECS, "by_category")
    # helpful pairs: human labels only (ai-help2 has none: left out); other pairs: the AI label
    assert [r["key"] for r in out] == ["h-help1-ann1", "h-help1-ann2", "ai-harm1", "ai-harm2", "h-cat",
                                       "h-other-help", "h-cat-only"]


def test_by_category_follows_the_recorded_prompt_set():
    """A user's own helpful set (ids and categories of their own) is split by the prompt file each pair came from,
    recorded as prompt_set; without it the id prefix/category decide, and a recorded red_team set wins over both."""
    own = [dict(ai("ai-mine", "soup?", "s1", "s2", "cooking", "mine-1"), prompt_set="helpful"),
           dict(ai("ai-tea", "tea?", "t1", "t2", "helpful", "x-1"), prompt_set="red_team")]
    people = [hum("h-mine", "soup?", "s1", "s2", "ann-1"), hum("h-tea", "tea?", "t1", "t2", "ann-1")]
    assert [r["key"] for r in merge_sources(own, people, "by_category")] == ["h-mine", "ai-tea"]
    bare = [{k: v for k, v in r.items() if k != "prompt_set"} for r in own]
    assert [r["key"] for r in merge_sources(bare, people, "by_category")] == ["ai-mine", "h-tea"]


def test_merge_edge_cases():
    assert [r["key"] for r in merge_sources(AI, [], "human_first")] == [r["key"] for r in AI]
    # no AI labels: every human record, those of one pair together
    assert [r["key"] for r in merge_sources([], HUMAN_RECS, "human_first")] == [
        "h-help1-ann1", "h-help1-ann2", "h-harm1", "h-other-help", "h-other-harm", "h-cat", "h-cat-only", "h-prompt-diff"]
    assert merge_sources(AI, [], "by_category") == [r for r in AI if r["key"] in ("ai-harm1", "ai-harm2")]
    with pytest.raises(CaiError, match=r"feedback.mixed_rule=random: expected one of human_first, by_category"):
        merge_sources(AI, HUMAN_RECS, "random")


# --- shipped examples ---------------------------------------------------------------------------------------


def prompt_sets():
    out = {}
    for name in ("red_team_train", "helpful_train"):
        for line in (ROOT / "prompts" / "sets" / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[r["id"]] = r["prompt"]
    return out


def test_shipped_examples_load():
    sets = prompt_sets()
    labels = load_human_comparisons(ROOT / "prompts/human/example_labels.jsonl")
    assert len(labels) == 12
    assert {r["annotator"] for r in labels} == {"ann-1", "ann-2"}
    assert 0.5 in {r["soft_label"] for r in labels}
    assert any(r["soft_label"] not in (0.0, 0.5, 1.0) for r in labels)
    assert all(sets[r["prompt_id"]] == r["prompt"] for r in labels)
    ranked = load_human_rankings(ROOT / "prompts/human/example_rankings.jsonl")
    assert len(ranked) == 12 and {r["ranking_size"] for r in ranked} == {4}
    assert all(sets[r["prompt_id"]] == r["prompt"] for r in ranked)
    demos = load_demonstrations(ROOT / "prompts/human/example_demonstrations.jsonl")
    assert len(demos) == 6 and all(sets[r["prompt_id"]] == r["prompt"][0]["content"] for r in demos)
    # the human records work with the AI diagnostics: an AI record for a labelled pair, in the other order
    h = labels[0]
    a = dict(h, source="ai", annotator="labeler", soft_label=0.2, agree=True,
             answer_a=h["answer_b"], answer_b=h["answer_a"])
    diag = label_diagnostics([a], labels + ranked)
    assert diag["human_shared"] == 2 and diag["human_agreement"] == 1.0
