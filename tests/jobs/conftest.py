"""Fixtures of the command tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def job(tmp_path, monkeypatch, capsys):
    """vit-pretrain --preset smoke --out <tmp>/runs ARGS in this process -> (exit code,
    stdout, stderr), with Ray's start a tripwire: what these tests check must be refused
    before Ray starts (a real Ray start is the slow tests' and
    test_bad_init_and_resume_fail_before_ray_with_one_line's)."""
    from pipeline import interrupt

    def no_ray(**kwargs):
        raise AssertionError("Ray started")

    saved = dict(os.environ)      # the command sets library variables for its own process
    monkeypatch.setattr(interrupt, "ray_init", no_ray)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from jobs.pretrain import main

    def run(*args, out=tmp_path / "runs"):
        code = main(["--preset", "smoke", "--out", str(out), *map(str, args)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    os.environ.clear()
    os.environ.update(saved)
