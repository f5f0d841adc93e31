"""Prompt templates: slot filling, error messages, and the slots of the shipped template files."""

from __future__ import annotations

import pytest

from cai.errors import CaiError
from cai.paths import PROJECT_ROOT
from cai.templates import Template, load_template

TEMPLATES = PROJECT_ROOT / "prompts" / "templates"

FEEDBACK_SLOTS = {"conversation", "question", "answer_a", "answer_b"}
EXPECTED_SLOTS = {
    "critique.txt": {"prompt", "answer", "critique_request"},
    "revision.txt": {"prompt", "answer", "critique_request", "critique", "revision_request"},
    "feedback_mc.txt": FEEDBACK_SLOTS,
    "feedback_mc_shared_prefix.txt": FEEDBACK_SLOTS,
    "feedback_cot.txt": FEEDBACK_SLOTS,
    "feedback_cot_answer.txt": set(),
    "conversation.txt": {"prompt"},
    "judge_mc.txt": FEEDBACK_SLOTS,  # cai.compare's judge
    "judge_harmless.txt": set(),  # judge questions (plain text)
    "judge_helpful.txt": set(),
    "crlft_condition.txt": {"source"},  # C-RLFT's condition line (sft.crlft.condition_template)
}


def test_render_fills_every_slot():
    t = Template("t.txt", "Human: {{prompt}}\nAssistant: {{ answer }}\nAgain: {{prompt}}")
    assert t.slots == {"prompt", "answer"}
    assert t.render(prompt="hi", answer="hello") == "Human: hi\nAssistant: hello\nAgain: hi"


def test_missing_slot_error_names_file_and_slot(tmp_path):
    path = tmp_path / "crit.txt"
    path.write_text("Q: {{prompt}} A: {{answer}}\n", encoding="utf-8")
    t = load_template(path)
    with pytest.raises(CaiError) as e:
        t.render(prompt="hi")
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    assert "no value for slot(s) ['answer']" in msg


def test_unused_value_is_an_error():
    t = Template("x.txt", "Q: {{prompt}}")
    with pytest.raises(CaiError, match=r"x\.txt: value\(s\) given for \['extra'\] but the template has no such slot"):
        t.render(prompt="p", extra="e")


def test_value_containing_slot_syntax_is_not_expanded_again():
    t = Template("t.txt", "{{a}}|{{b}}")
    assert t.render(a="{{b}}", b="B") == "{{b}}|B"
    assert t.render(a="x", b="{{ a }}") == "x|{{ a }}"


def test_trailing_newline_is_dropped_but_inner_ones_kept(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("line one\n\n{{x}}\n", encoding="utf-8")
    assert load_template(path).render(x="X") == "line one\n\nX"


@pytest.mark.parametrize("name", sorted(EXPECTED_SLOTS))
def test_shipped_templates_have_exactly_the_expected_slots(name):
    t = load_template(TEMPLATES / name)
    assert t.slots == EXPECTED_SLOTS[name]


def test_every_shipped_template_is_checked():
    assert {p.name for p in TEMPLATES.glob("*.txt")} == set(EXPECTED_SLOTS)


def test_shipped_templates_load_by_relative_path():
    # configs name templates relative to the project; resolve_path finds them from any working directory
    t = load_template("prompts/templates/critique.txt")
    assert t.slots == EXPECTED_SLOTS["critique.txt"]


@pytest.mark.parametrize("name", ["feedback_mc.txt", "feedback_mc_shared_prefix.txt"])
def test_multiple_choice_templates_end_with_open_paren(name):
    t = load_template(TEMPLATES / name)
    text = t.render(conversation="Human: hi\n\nAssistant: hello", question="Which is kinder?",
                    answer_a="first", answer_b="second")
    assert text.endswith("The answer is: (")
    assert "(A) first\n(B) second" in text


def test_cot_answer_template_renders_without_values():
    assert load_template(TEMPLATES / "feedback_cot_answer.txt").render() == "\nTherefore, the better response is: ("


def test_non_utf8_template_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 {{x}}".encode("latin-1"))
    with pytest.raises(CaiError, match=r"latin1\.txt: not UTF-8 text \(byte 3\)"):
        load_template(path)


def test_missing_template_file_is_an_error(tmp_path):
    with pytest.raises(CaiError, match="template file not found"):
        load_template(tmp_path / "nope.txt")
