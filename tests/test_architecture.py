"""The package's shape, checked: layers, no import circles, a torch-free bottom, imports at the top, every setting
validated before any work, the package map in docs/ARCHITECTURE.md, ruff."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from cai.config import load_config, stage_schemas
from cai.errors import CaiError
from tests.conftest import ROOT

PACKAGE = ROOT / "cai"
# cai modules that import torch, transformers, trl or vllm when imported: the only ones another cai module may
# import inside a function (where start-up time needs it), each such import marked "# heavy"
HEAVY = ("cai.stages", "cai.train", "cai.backends.transformers_backend", "cai.losses", "cai.serve")


def module_names() -> list[str]:
    out = []
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_layers_contract_holds():
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout
    assert "ignore_imports" not in (ROOT / "pyproject.toml").read_text()  # no exceptions listed


def test_no_import_circles():
    """Strongly connected components of the module graph (imports inside functions too) are single modules."""
    import grimp

    graph = grimp.build_graph("cai")
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for m in modules:
        if m not in index:
            strongconnect(m)
    circles = [sorted(c) for c in sccs if len(c) > 1]
    assert circles == []


def test_bottom_layers_do_not_import_torch():
    code = ("import sys; import cai.config, cai.records, cai.io, cai.runs, cai.store, cai.human, cai.label; "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'vllm') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cai_imports_are_at_the_top_except_heavy_modules():
    """An import of a cai module inside a function is allowed only for a heavy module, and says so."""
    bad = []
    for p in sorted(PACKAGE.rglob("*.py")):
        lines = p.read_text().splitlines()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.col_offset > 0 and (node.module or "").startswith("cai"):
                heavy = node.module.startswith(HEAVY)
                marked = "# heavy" in lines[node.lineno - 1] or "# heavy" in lines[node.end_lineno - 1]
                if not (heavy and marked):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Import) and node.col_offset > 0:
                bad += [f"{p.relative_to(ROOT)}:{node.lineno}: import {a.name}" for a in node.names
                        if a.name.startswith("cai")]
    assert bad == []


def test_package_map_matches_the_tree():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Package map"):text.index("## ", text.index("## Package map") + 5)]
    named = set()
    for line in table.splitlines():
        if line.startswith("|") and line.count("|") >= 4:
            for cell in line.split("|")[2].split("`"):
                if cell.startswith("cai/") and cell.endswith(".py"):
                    named.add(cell)
    actual = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or
              p.parent.name == "backends"}
    assert sorted(actual - named) == [], "modules missing from the package map"
    assert sorted(named - actual) == [], "the package map names modules that do not exist"


def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "cai", "benchmarks", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


# --- every numeric setting is checked before any work ------------------------------------------------------


def numeric_settings(schema: type, prefix: str = ""):
    """(dotted key, a value its constraints refuse) for every constrained numeric field of a schema."""
    for f in fields(schema):
        default = f.default_factory() if callable(getattr(f, "default_factory", None)) else f.default
        if is_dataclass(default):
            yield from numeric_settings(type(default), f"{prefix}{f.name}.")
            continue
        meta = f.metadata
        if "gt" in meta or "ge" in meta:
            yield f"{prefix}{f.name}", meta.get("gt", meta.get("ge")) - 1
        if "le" in meta or "lt" in meta:
            yield f"{prefix}{f.name}", meta.get("le", meta.get("lt")) + 1
        if f.type in ("float", "Optional[float]"):
            yield f"{prefix}{f.name}", ".nan"


@pytest.mark.parametrize("stage", sorted(stage_schemas()))
def test_every_numeric_setting_is_checked_on_load(stage):
    cases = list(numeric_settings(stage_schemas()[stage]))
    assert len(cases) > 20
    for key, bad in cases:
        with pytest.raises(CaiError, match=rf"^{key.replace('.', '[.]')}=") as e:
            load_config([f"stage={stage}", f"{key}={bad}"])
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [["stage=rl", "ppo.learning_rate=-1"], ["stage=sl", "sft.epochs=0"],
                                  ["stage=dpo", "dpo.beta=-0.1"], ["stage=rl", "pm.eval_fraction=1.5"],
                                  ["stage=rl", "ppo.kl_horizon=0"], ["stage=rl", "ppo.max_grad_norm=-1"],
                                  ["stage=sl", "sampling.temperature=.nan"]])
def test_bad_setting_exits_2_with_one_line_before_importing_torch(argv, tmp_path):
    code = ("import sys\nfrom cai.pipeline import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert 'torch' not in sys.modules, 'torch was imported'\n    raise\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv, f"runs_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {argv[1].split('=')[0]}="), proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
