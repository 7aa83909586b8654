"""Import directions: stages compose the shared spine and never import each other; lower layers never import up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwen3asr_train"


def imported_modules(path: Path) -> set[str]:
    """Every ``qwen3asr_train`` module a file imports (absolute imports, any nesting: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m.startswith("qwen3asr_train")}


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


@pytest.mark.parametrize("path", _modules("stages"), ids=lambda p: p.name)
def test_no_stage_imports_another_stage(path):
    stages = {f"qwen3asr_train.stages.{p.stem}" for p in _modules("stages") if p.stem != "__init__"}
    bad = {m for m in imported_modules(path) if m in stages and m != f"qwen3asr_train.stages.{path.stem}"}
    assert not bad, f"{path.name} imports {sorted(bad)}: move the shared step into qwen3asr_train/spine.py"


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("data", ("qwen3asr_train.stages", "qwen3asr_train.spine", "qwen3asr_train.training")),
        ("model", ("qwen3asr_train.stages", "qwen3asr_train.spine", "qwen3asr_train.training")),
        ("eval", ("qwen3asr_train.stages", "qwen3asr_train.spine")),
        ("rl", ("qwen3asr_train.stages", "qwen3asr_train.spine")),
        ("config", ("qwen3asr_train.stages", "qwen3asr_train.data", "qwen3asr_train.model", "qwen3asr_train.rl")),
    ],
)
def test_lower_layers_do_not_import_upwards(layer, forbidden):
    bad = {
        f"{path.name}: {m}"
        for path in _modules(layer)
        for m in imported_modules(path)
        if any(m == f or m.startswith(f + ".") for f in forbidden)
    }
    assert not bad, sorted(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The AST walk finds lazy (function-level) imports, the kind that slipped through before."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from qwen3asr_train.stages.aligner import usable_for_alignment\n")
    assert "qwen3asr_train.stages.aligner" in imported_modules(fake)
