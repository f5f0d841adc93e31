import os
import sys
from pathlib import Path

import pytest

from cai.pipeline import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # one torch thread per worker: the workers share the cores
    os.environ.setdefault("CAI_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture
def python():
    return sys.executable


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 20) -> tuple[int, dict]:
    """Raw bytes to a loopback server, read until it closes: (status, JSON body). A dropped connection fails here."""
    import json
    import socket

    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), f"no HTTP answer: {head[:80]!r}"
    return int(head.split()[1]), json.loads(body)


def tiny_sl_run(root: Path, red_team_limit: int) -> tuple[Path, Path]:
    """A tiny SL-CAI run `r` under root/runs (the test constitution copied to root) to start RL from."""
    import shutil

    const = root / "constitution.yaml"
    shutil.copyfile(ASSETS / "constitutions" / "good.yaml", const)
    main(["stage=sl", "run=r", f"runs_dir={root / 'runs'}", f"constitution={const}", "generator.model=tiny",
          f"red_team.limit={red_team_limit}", "critique.rounds=1", "critique.few_shot=0", "sampling.max_new_tokens=4",
          "sft.helpful_ratio=0.5", "sft.batch_size=4", "progress=false"])
    return root, const
