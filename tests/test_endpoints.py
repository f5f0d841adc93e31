"""Keys and endpoints: where requests and API keys may go is decided on the command line, not by a run directory."""

from __future__ import annotations

import shutil

import pytest
import yaml

from cai.compare import main as compare
from cai.config import load_config
from cai.errors import CaiError


@pytest.mark.parametrize("override,expected", [
    ("generator.api_key_env=AWS_SECRET_ACCESS_KEY", "expected the name of an API key variable"),
    ("generator.api_key_env=HOME", "expected the name of an API key variable"),
    ("generator.base_url=http://user:secret@127.0.0.1:8000", "credentials in the URL are refused"),
    ("generator.base_url=file:///etc/passwd", r"expected http\(s\)://host"),
])
def test_endpoint_settings_are_checked_on_load(override, expected):
    with pytest.raises(CaiError, match=expected):
        load_config(["stage=sl", override])
    load_config(["stage=sl", "generator.api_key_env=MY_PROVIDER_API_KEY", "generator.base_url=http://127.0.0.1:9"])


def run_dir_with_endpoint(tmp_path, section: dict):
    run = tmp_path / "runs" / "sent"
    run.mkdir(parents=True)
    (run / "config.sl.yaml").write_text(yaml.safe_dump({"stage": "sl", "generator": {
        "model": "m", "backend": "openai", "base_url": "http://127.0.0.1:9", **section}}))
    other = tmp_path / "runs" / "mine"
    shutil.copytree(run, other)
    return run, other


def test_a_run_directory_cannot_choose_the_endpoint_or_the_key_variable(tmp_path, capsys):
    run, other = run_dir_with_endpoint(tmp_path, {})
    with pytest.raises(SystemExit) as e:
        compare([str(run), str(other), "judge.model=tiny", f"out={tmp_path / 'rep'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "confirm it on the command line with endpoints=[http://127.0.0.1:9]" in err
    assert not (tmp_path / "rep").exists()

    run2, other2 = run_dir_with_endpoint(tmp_path / "b", {"api_key_env": "AWS_SECRET_ACCESS_KEY"})
    with pytest.raises(SystemExit) as e:
        compare([str(run2), str(other2), "judge.model=tiny", "endpoints=[http://127.0.0.1:9]",
                 f"out={tmp_path / 'rep2'}"])
    assert e.value.code == 2 and "api_key_env=AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err
