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

from tests.conftest import sqlite_store

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMANDS = {"vit-pretrain": "jobs.pretrain", "vit-vtab": "eval.vtab",
            "vit-compare": "eval.compare", "vit-shards": "jobs.make_shards",
            "vit-export": "jobs.export", "vit-demo": "jobs.demo", "vit-stack": "infra.local_stack",
            "vit-analyze": "jobs.analyze"}


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
    for module in ("eval.vtab", "eval.compare", "jobs.export", "jobs.analyze"):
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


def test_a_logged_config_reruns_and_bad_ones_say_why(tmp_path):
    """--show-config's JSON (what MLflow keeps as config.json) fed back with --config gives
    the same resolved config; --set applies on top; mistakes are one line and exit 2."""
    first = subprocess.run([str(BIN / "vit-pretrain"), "--preset", "vit_b16_i21k_augreg",
                            "--set", "optim.lr=5e-4", "--show-config"], capture_output=True,
                           text=True, timeout=120)
    (tmp_path / "config.json").write_text(first.stdout)
    again = subprocess.run([str(BIN / "vit-pretrain"), "--config", str(tmp_path / "config.json"),
                            "--show-config"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == first.stdout
    (tmp_path / "bad.json").write_text('{"optim": {"learning_rate": 1}}')
    for args, message in (
            (["--config", str(tmp_path / "config.json"), "--preset", "smoke"],
             "--config and --preset both name a starting configuration"),
            (["--config", str(tmp_path / "missing.json")], "cannot read it"),
            (["--config", str(tmp_path / "bad.json")],
             "unknown config keys ['optim.learning_rate']")):
        out = subprocess.run([str(BIN / "vit-pretrain"), *args, "--show-config"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_configs_that_runs_of_an_earlier_release_logged_still_load():
    """`--show-config` of commit 87df5b9 for both commands (what their runs logged as
    config.json; tests/fixtures) fed back with --config: each prints the keys that moved
    in their sections now (pretraining: the few-shot probe's), every value the same."""
    import json

    from eval.config import VtabConfig
    from pipeline.train.config import PretrainConfig

    fixtures = ROOT / "tests" / "fixtures"
    pretrain = subprocess.run([str(BIN / "vit-pretrain"), "--config",
                               str(fixtures / "config_v0_pretrain.json"), "--show-config"],
                              capture_output=True, text=True, timeout=120)
    assert pretrain.returncode == 0, pretrain.stderr
    shown = json.loads(pretrain.stdout)
    old = json.loads((fixtures / "config_v0_pretrain.json").read_text())
    for section, values in old.items():
        for key, value in values.items():
            new = PretrainConfig.ALIASES.get(f"{section}.{key}", f"{section}.{key}")
            assert shown[new.split(".")[0]][new.split(".")[1]] == value, (section, key)
    assert "key(s) of an earlier release" in pretrain.stderr
    vtab = subprocess.run([str(BIN / "vit-vtab"), "--config",
                           str(fixtures / "config_v0_vtab.json"), "--show-config"],
                          capture_output=True, text=True, timeout=120)
    assert vtab.returncode == 0, vtab.stderr
    shown, old = json.loads(vtab.stdout), json.loads((fixtures / "config_v0_vtab.json")
                                                     .read_text())
    assert {key: shown[new.split(".")[0]][new.split(".")[1]]
            for key, new in VtabConfig.ALIASES.items()} == old
    assert vtab.stderr.strip().splitlines() == [
        "config: 19 key(s) of an earlier release read by their names now (batch_size -> "
        "finetune.batch_size, checkpoint -> run.checkpoint, cpus_per_trial -> "
        "sweep.cpus_per_trial, ...)"]


def test_placeholders_are_refused_before_anything_starts(tmp_path):
    """The presets' `s3://CHANGE-ME` and the cluster files' `your-bucket` end the command in
    a second with one line, not minutes later on a cluster as a missing bucket."""
    for cmd, message in (
            (["vit-pretrain", "--preset", "vit_b16_i21k"],
             "error: data.uri is still the placeholder 's3://CHANGE-ME/i21k': replace "
             "'CHANGE-ME' with your own bucket"),
            (["vit-pretrain", "--preset", "smoke", "--out", "s3://your-bucket/runs"],
             "error: run.storage (--out) is still the placeholder 's3://your-bucket/runs'"),
            (["vit-vtab", "--checkpoint", "s3://your-bucket/runs/b16", "--data",
              str(tmp_path)], "error: --checkpoint is still the placeholder")):
        out = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().startswith(message), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert "Ray" not in out.stdout            # refused before Ray was started


def test_old_spellings_work_for_one_release_with_a_warning(tmp_path):
    """The spellings before the commands agreed still run, each with one deprecation line."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}
    shards = subprocess.run([str(BIN / "vit-shards"), "synthetic", "-", str(tmp_path / "ds"),
                             "--num-samples", "8", "--image-size", "16"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert shards.returncode == 0, shards.stderr[-2000:]
    assert "write --out " in shards.stderr and (tmp_path / "ds" / "manifest.json").exists()
    compare = subprocess.run([str(BIN / "vit-compare"), "no-such-run", "--no-log"],
                             capture_output=True, text=True, timeout=120, env=env)
    lines = compare.stderr.strip().splitlines()
    assert compare.returncode == 2 and lines[0] == (
        "warning: --no-log is deprecated and goes in the next release; use --no-mlflow")
    assert lines[-1].startswith("error: ")
    export = subprocess.run([str(BIN / "vit-export"), str(tmp_path / "nothing"),
                             str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120, env=env)
    lines = export.stderr.strip().splitlines()
    assert export.returncode == 2 and "write --checkpoint " in lines[0], lines
    assert lines[-1].startswith("error: checkpoint not found")


def test_what_a_commands_local_ray_leaves_is_killed_and_nothing_else(monkeypatch):
    """`interrupt.sweep_local_ray` (run as a command exits, after Ray's own shutdown) kills
    the processes that carry this command's local-Ray mark, which every process of that Ray
    inherits, and no other process: not another command's Ray, not one without a mark."""
    import signal

    from pipeline import interrupt

    procs = {}
    for name, mark in (("ours", "cmd-1"), ("another command's", "cmd-2"), ("unmarked", None)):
        if mark is None:
            monkeypatch.delenv(interrupt._LOCAL_RAY_MARK, raising=False)
        else:
            monkeypatch.setenv(interrupt._LOCAL_RAY_MARK, mark)
        procs[name] = subprocess.Popen(["sleep", "60"])
    monkeypatch.setenv(interrupt._LOCAL_RAY_MARK, "cmd-1")
    try:
        assert interrupt.sweep_local_ray() == [procs["ours"].pid]
        assert procs["ours"].wait(timeout=10) == -signal.SIGKILL
        assert all(p.poll() is None for n, p in procs.items() if n != "ours")
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


_SIGTERM_IN_A_CALLBACK = r'''
import os, signal, sys, weakref
from pipeline import cli

def ray_like_handler(signum, frame):          # as Ray's worker sigterm_handler does
    sys.exit(1)

signal.signal(signal.SIGTERM, ray_like_handler)
if sys.argv[1] == "hooked":
    cli.ray_worker_setup()

class Thing:
    pass

def callback(ref):                              # a weakref callback: SystemExit is unraisable
    os.kill(os.getpid(), signal.SIGTERM)        # the handler runs here, inside the callback

thing = Thing()
ref = weakref.ref(thing, callback)
del thing
print("went on", flush=True)
'''


@pytest.mark.parametrize("setup", ["hooked", "plain"])
def test_a_sigterm_inside_a_callback_exits_quietly(tmp_path, setup):
    """Ray's SIGTERM handler raises SystemExit; in a weakref callback Python prints it as
    "Exception ignored" with a traceback and goes on (the plain process shows it). A worker
    with our set-up hook exits with the handler's code and prints nothing."""
    done = subprocess.run([sys.executable, "-c", _SIGTERM_IN_A_CALLBACK, setup],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if setup == "plain":
        assert "Exception ignored" in done.stderr and "went on" in done.stdout
    else:
        assert (done.returncode, done.stdout, done.stderr) == (1, "", "")


def test_ray_trains_transient_resource_request_warning_is_one_line(tmp_path):
    """The warning Ray Train's controller logs when the autoscaling coordinator does not
    answer within 5 s (a loaded machine; "safe to ignore"), from its own logger, through
    Ray's worker log format: one line naming the error, no traceback (it failed a run's
    "no traceback" check in CI)."""
    script = r'''
import logging, sys
from pipeline import cli
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
cli.ray_worker_setup()
log = logging.getLogger(cli._TRANSIENT)
try:
    raise TimeoutError("Get timed out: some object(s) not ready.")
except Exception:
    log.warning("Failed to send resource request for %s.", "train-1", exc_info=True)
'''
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "WARNING Failed to send resource request for train-1. (TimeoutError: Get timed out: "
        "some object(s) not ready.)"], done.stdout
