"""`vit-pretrain` refuses bad input before Ray starts (pipeline/train/preflight.py): one
`error: ...` line, exit 2, nothing written to --out, and no Ray.

Most cases run the command in this process with a tripwire where Ray would start
(`interrupt.ray_init`): a refusal that came after it would end as "training failed" (exit
1). The resolved config, printed just before Ray starts, must not have been printed either.
One case runs the real command line and checks that no Ray temp folder appeared."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.security import corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Real shards of 10 classes (train and val splits), as vit-shards writes them."""
    from jobs.make_shards import main as make_shards

    out = tmp_path_factory.mktemp("data") / "ds"
    assert make_shards(["synthetic", "--out", str(out), "--num-samples", "24",
                        "--image-size", "32"]) == 0
    return out


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> Path:
    """A complete training checkpoint of the smoke preset, in a run folder `other`."""
    return corpus.write_good_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "other" / "step_00000002", step=2)


def refused(result, says: str) -> str:
    """The command stopped with one `error:` line holding `says`, exit 2, before Ray and
    before printing the resolved config."""
    code, out, err = result
    assert code == 2, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-2000:]
    assert says in errors[0], errors[0]
    assert "Traceback" not in err and "Ray started" not in err
    assert "resolved config" not in out, "the refusal came after the config (Ray is next)"
    return errors[0]


def nothing_written(folder: Path) -> None:
    assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# Where a local Ray would start
# ---------------------------------------------------------------------------------------------
def test_a_temp_folder_too_long_for_a_local_rays_sockets(job, tmp_path, monkeypatch):
    """A TMPDIR (or RAY_TMPDIR) whose socket paths would pass Linux's 107 bytes: Ray refuses
    it after starting ("training failed: validate_socket_filename failed"), and a TMPDIR
    short enough for Ray but not for multiprocessing's sockets made the dashboard wait a
    minute. Refused before Ray, naming the variable and the fix; a cluster is not asked."""
    long = tmp_path / ("t" * 80)
    long.mkdir()
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(long))
    line = refused(job(), f"TMPDIR={long} is {len(str(long))} bytes, too long for the socket")
    assert "export TMPDIR=/tmp" in line and "--address" in line
    nothing_written(tmp_path / "runs")
    # Ray's own folder moved (RAY_TMPDIR): multiprocessing's sockets still go under TMPDIR.
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")
    refused(job(), f"TMPDIR={long} is")
    monkeypatch.setenv("TMPDIR", "/tmp")
    monkeypatch.setenv("RAY_TMPDIR", str(long))
    refused(job(), f"RAY_TMPDIR={long} is")


@pytest.mark.ray
@pytest.mark.slow
def test_the_temp_folder_limit_is_rays():
    """At the limit the check allows, a real local Ray starts; one byte longer, Ray itself
    refuses the folder (its pid is in its socket paths: each process works out its own)."""
    probe = """
import os, sys
from pipeline import cli
room = cli.SOCKET_PATH_MAX - cli.ray_socket_suffix() + int(sys.argv[2])
folder = os.path.join(sys.argv[1], "t" * (room - len(sys.argv[1]) - 1))
os.makedirs(folder)
os.environ["RAY_TMPDIR"] = folder
print("ours:", cli.temp_dir_problem(None) is None)
import ray
try:
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    print("ray: started")
except OSError as err:
    print("ray:", "validate_socket_filename" in str(err) and "refused")
finally:
    ray.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    for extra, ours, ray in ((0, "ours: True", "ray: started"), (1, "ours: False", "ray: refused")):
        base = tempfile.mkdtemp(prefix="tl", dir="/tmp")    # pytest's own are too long here
        try:
            out = subprocess.run([sys.executable, "-c", probe, base, str(extra)], env=env,
                                 capture_output=True, text=True, timeout=300, cwd="/")
        finally:
            shutil.rmtree(base, ignore_errors=True)
        assert ours in out.stdout and ray in out.stdout, (out.stdout + out.stderr)[-3000:]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_missing_data_folder(job, tmp_path):
    line = refused(job("--data", tmp_path / "nowhere"), "no such folder")
    assert str(tmp_path / "nowhere") in line and "manifest.json" in line
    nothing_written(tmp_path / "runs")


def test_data_folder_without_shards_or_manifest(job, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(job("--data", tmp_path / "empty"), "no manifest.json")
    nothing_written(tmp_path / "runs")


def test_manifest_whose_shards_are_gone(job, tmp_path, dataset):
    (tmp_path / "moved").mkdir()
    shutil.copy(dataset / "manifest.json", tmp_path / "moved")
    refused(job("--data", tmp_path / "moved"), "none of the")


def test_a_split_the_manifest_lacks(job, tmp_path, dataset):
    line = refused(job("--data", dataset, "--set", "data.split=nosuch"), "no split 'nosuch'")
    assert "'train'" in line                        # names the splits it has
    nothing_written(tmp_path / "runs")


def test_more_classes_than_the_model_has(job, dataset):
    refused(job("--data", dataset, "--set", "model.num_classes=5"), "set model.num_classes")


# ---------------------------------------------------------------------------------------------
# Storage (--out)
# ---------------------------------------------------------------------------------------------
def test_out_is_a_file(job, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    refused(job(out=tmp_path / "a-file"), "the --out folder is a file")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_out_cannot_be_created_under_a_file(job, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    refused(job(out=tmp_path / "a-file" / "runs"), f"{tmp_path / 'a-file'} is a file")


def test_run_folder_is_a_file(job, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "smoke").write_text("mine")
    refused(job(), "the run folder is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_out_not_writable(job, tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    refused(job(out=tmp_path / "locked" / "runs"), "is not writable")
    nothing_written(tmp_path / "locked")


# ---------------------------------------------------------------------------------------------
# --init / --resume
# ---------------------------------------------------------------------------------------------
def test_init_missing(job, tmp_path):
    refused(job("--init", tmp_path / "nowhere"), f"checkpoint not found: {tmp_path}/nowhere")
    nothing_written(tmp_path / "runs")


def test_init_not_a_vit_checkpoint(job, tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 4)}, str(tmp_path / "other.safetensors"))
    refused(job("--init", tmp_path / "other.safetensors"), "is not a ViT checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    refused(job("--init", tmp_path / "junk.safetensors"), "cannot read checkpoint file")
    nothing_written(tmp_path / "runs")


def test_init_of_another_architecture(job, tmp_path):
    """Read from vit.json and the safetensors header: the weights themselves are not read."""
    from pipeline.model import ViT
    from pipeline.train.config import smoke
    from pipeline.weights import save_vit

    save_vit(ViT(smoke().model.replace(hidden_size=96, mlp_dim=192)), tmp_path / "wide")
    refused(job("--init", tmp_path / "wide"), "width mismatch")


def test_resume_of_weights_without_training_state(job, tmp_path):
    from pipeline.model import ViT
    from pipeline.train.config import smoke
    from pipeline.weights import save_vit

    save_vit(ViT(smoke().model), tmp_path / "model")
    refused(job("--resume", tmp_path / "model"), "not a training checkpoint")
    refused(job("--resume", tmp_path / "nowhere"), "not a training checkpoint")
    nothing_written(tmp_path / "runs")


def test_resume_of_a_run_folder_names_its_newest_checkpoint(job, training_checkpoint):
    """--resume takes a checkpoint, as it always has; given the run folder it says which."""
    line = refused(job("--resume", training_checkpoint.parent), "is a run folder")
    assert f"--resume {training_checkpoint}" in line


@pytest.mark.parametrize("kind", ["metadata-dotted-name", "train_state-pickle"])
def test_hostile_resume_is_refused_without_running_it(job, tmp_path, training_checkpoint,
                                                      kind):
    marker = tmp_path / "PWNED"
    target = corpus.plant(Path(shutil.copytree(training_checkpoint, tmp_path / "o" /
                                               "step_00000002")), kind, marker)
    refused(job("--resume", target), str(target))
    assert not marker.exists(), "a hostile file ran code"


def test_the_runs_own_checkpoint_comes_before_init_and_resume(tmp_path, training_checkpoint):
    """The resume order is kept: this run's checkpoint wins, so a --init or --resume that
    would not be used is not checked either."""
    from pipeline.train import preflight
    from pipeline.train.config import apply_overrides, smoke

    shutil.copytree(training_checkpoint, tmp_path / "runs" / "smoke" / "step_00000002")
    cfg = apply_overrides(smoke(), [f"run.storage={tmp_path / 'runs'}"])
    preflight.check(cfg, init=str(tmp_path / "nowhere"), mlflow=False)
    preflight.check(cfg, resume=str(tmp_path / "nowhere"), mlflow=False)
    # ... and a changed run-defining config is refused before Ray too.
    changed = apply_overrides(cfg, ["optim.lr=0.5"])
    with pytest.raises(preflight.REFUSALS, match="already has checkpoints made with another"):
        preflight.check(changed, mlflow=False)


# ---------------------------------------------------------------------------------------------
# What passes: synthetic data, real shards; MLflow down is a warning
# ---------------------------------------------------------------------------------------------
def test_good_input_passes_and_writes_nothing(tmp_path, dataset):
    from pipeline.train import preflight
    from pipeline.train.config import apply_overrides, smoke

    cfg = apply_overrides(smoke(), [f"run.storage={tmp_path / 'runs'}"])
    assert preflight.check(cfg, mlflow=False) == preflight.Checked(None, None)
    shards = apply_overrides(cfg, ["data.source=shards", f"data.uri={dataset}"])
    checked = preflight.check(shards, mlflow=False)
    assert checked.manifest == json.loads((dataset / "manifest.json").read_text())
    assert not (tmp_path / "runs").exists()


def test_mlflow_server_down_is_one_warning(tmp_path, monkeypatch, caplog):
    from pipeline.train import preflight
    from pipeline.train.config import apply_overrides, smoke

    cfg = apply_overrides(smoke(), [f"run.storage={tmp_path / 'runs'}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        checked = preflight.check(cfg)
    assert checked.tracking_down
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not answer" in warnings[0], warnings
    assert "training goes on" in warnings[0] and "run folder" in warnings[0]
    assert preflight.check(cfg, mlflow=False).tracking_down is None   # --no-mlflow: not asked


@pytest.mark.mlflow
def test_mlflow_server_that_answers(mlflow_server, tmp_path, monkeypatch):
    from pipeline.train.preflight import tracking_problem

    assert tracking_problem(mlflow_server.uri) is None
    assert tracking_problem(f"sqlite:///{tmp_path}/m.db") is None      # a local store


# ---------------------------------------------------------------------------------------------
# The real command line
# ---------------------------------------------------------------------------------------------
def test_bad_init_and_resume_fail_before_ray_with_one_line(tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a checkpoint")
    not_training = tmp_path / "model"
    from pipeline.model import ViT
    from pipeline.train.config import smoke
    from pipeline.weights import save_vit

    save_vit(ViT(smoke().model), not_training)        # weights, but no training state
    # Where a Ray start would make its folder: short, as a local Ray's sockets need.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    try:
        for flag, path, says in (("--init", bad, "weights.safetensors"),
                                 ("--resume", not_training, "not a training checkpoint")):
            out = subprocess.run([sys.executable, "jobs/pretrain.py", "--preset", "smoke",
                                  "--out", str(tmp_path / "runs"), flag, str(path)], env=env,
                                 capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert out.returncode == 2, out.stderr[-3000:]
            assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr[-3000:]
            assert out.stderr.startswith("error: ") and says in out.stderr, out.stderr
            assert out.stdout == "", "nothing printed before the refusal (the config, Ray)"
            assert not any(ray_tmp.iterdir()), "Ray started"
            assert not (tmp_path / "runs").exists(), "nothing written"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_down_is_said_once_and_the_run_goes_on_losing_no_metric(
        ray_local, mlflow_server, tmp_path, dataset):
    """Nobody listens at MLFLOW_TRACKING_URI: one warning before Ray starts (the second
    attempt, after it, says nothing more), and the run trains on its shards, its metrics
    kept in the run folder. The same command once the server answers: nothing to train, and
    every metric is sent (none lost, none twice)."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "jobs/pretrain.py", "--preset", "smoke", "--out",
           str(tmp_path / "runs"), "--name", "offline", "--data", str(dataset),
           "--set", "train.total_steps=20", "--set", "train.log_every=5",
           "--set", "checkpoint.every=10", "--set", "probe.every=0",
           "--set", "train.system_metrics_s=0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    said = [ln for ln in out.stderr.splitlines() if "MLflow" in ln and "WARNING" in ln]
    assert len(said) == 1 and "does not answer" in said[0], said
    assert "finished at step 20" in out.stdout
    assert list((tmp_path / "runs" / "offline").glob("pending_metrics-*.jsonl"))

    again = subprocess.run(cmd, env={**env, "MLFLOW_TRACKING_URI": mlflow_server.uri},
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vit-smoke").experiment_id],
                                "tags.`vit.run_name` = 'offline'")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [5, 10, 15, 20]
    assert list((tmp_path / "runs" / "offline").glob("pending_metrics-*")) == []
