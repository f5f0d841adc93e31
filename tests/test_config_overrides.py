"""Overrides are read by the setting's type: a string setting keeps the text as typed."""

from __future__ import annotations

import pytest

from cai.config import load_config
from cai.errors import CaiError


@pytest.mark.parametrize("typed", ["yes", "007", "null", "3.0"])
def test_a_string_setting_keeps_the_text_as_typed(typed):
    assert load_config(["stage=sl", f"run={typed}"]).run == typed


def test_sexagesimal_text_stays_text():
    assert load_config(["stage=sl", "generator.tokenizer=1:30"]).generator.tokenizer == "1:30"  # YAML 1.1: 90


def test_other_settings_take_the_yaml_reading():
    cfg = load_config(["stage=rl", "ppo.steps=7", "ppo.learning_rate=2e-5", "progress=false", "red_team.limit=null"])
    assert cfg.ppo.steps == 7 and cfg.ppo.learning_rate == 2e-5 and cfg.progress is False
    assert cfg.red_team.limit is None


def test_a_wrong_type_names_the_text_as_typed():
    with pytest.raises(CaiError, match=r"^override critique.rounds=yes: "):
        load_config(["stage=sl", "critique.rounds=yes"])
