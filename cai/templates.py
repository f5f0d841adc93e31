"""Prompt templates are text files with named slots written `{{slot}}`.

Rendering fails when a slot has no value or a value has no slot, so a template edit that drops or misspells
a slot is caught on the first render instead of silently producing a different prompt.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cai.errors import CaiError
from cai.paths import resolve_path

SLOT = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class Template:
    name: str  # file path, for error messages
    text: str

    @property
    def slots(self) -> set[str]:
        return set(SLOT.findall(self.text))

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def render(self, **values: str) -> str:
        missing = sorted(self.slots - values.keys())
        unused = sorted(values.keys() - self.slots)
        if missing:
            raise CaiError(f"{self.name}: no value for slot(s) {missing}; slots in the file are {sorted(self.slots)}")
        if unused:
            raise CaiError(f"{self.name}: value(s) given for {unused} but the template has no such slot; "
                           f"slots in the file are {sorted(self.slots)}")
        # One pass, so a value that itself contains `{{x}}` is not expanded again.
        return SLOT.sub(lambda m: str(values[m.group(1)]), self.text)


def load_template(path: str | Path) -> Template:
    p = resolve_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaiError(f"{path}: template file not found") from None
    except UnicodeDecodeError as e:
        raise CaiError(f"{path}: not UTF-8 text (byte {e.start})") from None
    # A trailing newline at the end of a file is an editor artefact, not part of the prompt.
    return Template(str(path), text[:-1] if text.endswith("\n") else text)
