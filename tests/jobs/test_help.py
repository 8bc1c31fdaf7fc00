"""Every console script's --help, walked: the commands agree on names, switches and help."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.jobs.test_commands import BIN, COMMANDS, ROOT


def _scripts() -> dict[str, str]:
    """The console scripts pyproject.toml installs: a new one cannot miss these checks."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _help_entries(text: str) -> dict[str, str]:
    """argparse's --help -> {first spelling of each option or positional: its help text},
    read from the sections ("options:", "positional arguments:"), not the epilog."""
    entries, name, in_section = {}, None, False
    for line in text.splitlines():
        if not line.strip():
            in_section, name = False, None
        elif line in ("options:", "positional arguments:"):
            in_section = True
        elif in_section and len(line) - len(line.lstrip()) == 2:
            head, _, help_text = line.strip().partition("  ")
            name = head.split()[0].rstrip(",")
            entries[name] = help_text.strip()
        elif in_section and name:
            entries[name] = (entries[name] + " " + line.strip()).strip()
    return entries


MLFLOW_COMMANDS = {"vit-pretrain", "vit-vtab", "vit-compare", "vit-analyze"}
CHECKPOINT_COMMANDS = {"vit-vtab", "vit-analyze", "vit-export"}


@pytest.mark.parametrize("command", sorted(_scripts()))
def test_every_command_agrees_on_its_help(command):
    """Every console script: a complete one-sentence description, help for every option,
    --log-level everywhere, --no-mlflow where the command logs to MLflow, --checkpoint where
    it reads one, and the same names for inputs (--data) and outputs (--out)."""
    assert command in COMMANDS, f"{command}: add it to COMMANDS (and to the README's table)"
    out = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr[-2000:]
    usage, description = out.stdout.split("\n\n")[:2]
    assert usage.startswith(f"usage: {command}")
    assert description.rstrip().endswith("."), f"{command}: description {description!r}"
    entries = _help_entries(out.stdout)
    missing = [name for name, text in entries.items() if name != "-h" and not text]
    assert not missing, f"{command}: no help for {missing}"
    assert "--log-level" in entries
    assert ("--no-mlflow" in entries) == (command in MLFLOW_COMMANDS), command
    if command in CHECKPOINT_COMMANDS:
        assert "--checkpoint" in entries
    for other in ("--images", "--root", "--no-log", "--dst", "--src", "--output"):
        assert other not in entries, f"{command}: {other} (use --data, --out, --no-mlflow)"
    positionals = [n for n in entries if not n.startswith("-")]
    assert len(positionals) <= 1, f"{command}: positionals {positionals}; use options"
