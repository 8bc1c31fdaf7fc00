"""The installed commands: console scripts and `python -m` forms work outside the checkout,
and no entry point patches sys.path (installing the project is what makes it importable;
`ray job submit --working-dir .` puts the working dir on PYTHONPATH)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMANDS = {"vit-pretrain": "jobs.pretrain", "vit-vtab": "eval.vtab",
            "vit-compare": "eval.compare", "vit-shards": "jobs.make_shards",
            "vit-export": "jobs.export", "vit-demo": "jobs.demo", "vit-stack": "infra.local_stack"}


def outside_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_console_scripts_run_outside_the_checkout(command, tmp_path):
    out = subprocess.run([str(BIN / command), "--help"], cwd=tmp_path, env=outside_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {command}"), out.stdout[:200]


def test_module_forms_run_outside_the_checkout(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--preset",
                          "vit_b16_i21k_augreg", "--show-config"], cwd=tmp_path,
                         env=outside_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"randaug_magnitude": 15' in out.stdout
    for module in ("eval.vtab", "eval.compare", "jobs.export"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path,
                              env=outside_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (module, done.stderr[-2000:])


def test_no_entry_point_patches_sys_path():
    for folder in ("jobs", "eval", "pipeline", "infra", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "path" and \
                        isinstance(node.value, ast.Name) and node.value.id == "sys":
                    pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} touches sys.path")
