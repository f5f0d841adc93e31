"""Where bundled files live and how relative paths in configs are resolved."""

from __future__ import annotations

import os
from pathlib import Path

# The checkout (editable install): constitutions/, prompts/, pipelines/ sit beside the package.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as the user wrote it: absolute, relative to the working directory, or else to the project."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    bundled = PROJECT_ROOT / p
    return bundled if bundled.exists() else p


def cache_dir() -> Path:
    """Converted models and other derived files: $CAI_CACHE, else $XDG_CACHE_HOME/cai, else ~/.cache/cai."""
    if os.environ.get("CAI_CACHE"):
        return Path(os.environ["CAI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cai"
