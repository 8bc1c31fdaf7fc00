"""The import rules of the codebase: jobs -> eval -> pipeline, never backwards;
Ray stays at the edges; nobody writes `import eval` (it shadows the builtin)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Plain PyTorch modules that must import (and unit-test) without Ray.
NO_RAY = ("pipeline/model.py", "pipeline/checkpoint.py", "pipeline/perf.py", "pipeline/analysis.py",
          "eval/tasks.py", "eval/data.py", "eval/finetune.py", "eval/report.py")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_pipeline_never_imports_eval_or_jobs():
    for path in python_files("pipeline"):
        bad = {m for m in imports(path) if m.split(".")[0] in ("eval", "jobs")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_eval_never_imports_jobs():
    for path in python_files("eval"):
        bad = {m for m in imports(path) if m.split(".")[0] == "jobs"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_nobody_writes_import_eval():
    for folder in ("pipeline", "eval", "jobs", "tests", "bench", "infra"):
        for path in python_files(folder):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    assert all(a.name != "eval" and not a.name.startswith("eval.")
                               for a in node.names), f"`import eval` in {path}"


def test_model_and_checkpoint_do_not_import_ray():
    for rel in NO_RAY:
        bad = {m for m in imports(ROOT / rel) if m.split(".")[0] == "ray"}
        assert not bad, f"{rel} imports {bad}"


def test_eval_takes_config_machinery_and_schedule_from_below_training():
    """Both halves use pipeline/config.py and pipeline/schedule.py; the evaluation never
    reaches into the training package for them."""
    for path in python_files("eval"):
        bad = {m for m in imports(path)
               if m in ("pipeline.train.config", "pipeline.train.schedule")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
