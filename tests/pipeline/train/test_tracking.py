"""MLflow tracking against a real server process: params, metrics, and an outage that must
not stop training nor lose metrics."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking


@pytest.mark.slow
@pytest.mark.mlflow
def test_outage_buffers_and_flushes(tmp_path, caplog):
    from tests.conftest import MlflowServer

    server = MlflowServer(tmp_path).start()
    try:
        run_id = tracking.start_run(server.uri, "exp-outage", "r1",
                                    {"optim.lr": 0.001, "data.uri": "s3://b/x",
                                     "AWS_SECRET_ACCESS_KEY": "nope"}, {"git_commit": "abc"})
        client = MlflowClient(server.uri)
        params = client.get_run(run_id).data.params
        assert params["optim.lr"] == "0.001" and "AWS_SECRET_ACCESS_KEY" not in params
        t = tracking.Tracker(server.uri, run_id, spill_uri=str(tmp_path / "spill"),
                             retry_every_s=0.0)
        t.log_metrics({"train/loss": 2.0}, step=1)
        server.stop()
        with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
            t.log_metrics({"train/loss": 1.5}, step=2)   # returns: training goes on
            t.log_metrics({"train/loss": 1.0}, step=3)
        assert "MLflow tracking unavailable" in caplog.text
        assert len(t.pending) == 2
        server.start()
        t.log_metrics({"train/loss": 0.5}, step=4)
        assert not t.pending
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5), (3, 1.0),
                                                               (4, 0.5)]
        # Still down at the very end: the metrics go to a file, not to /dev/null.
        server.stop()
        t.log_metrics({"train/loss": 0.25}, step=5)
        t.close()
        spilled = list((tmp_path / "spill").glob("pending_metrics-*.jsonl"))
        assert len(spilled) == 1
        rows = [json.loads(x) for x in spilled[0].read_text().splitlines()]
        assert rows == [{"run_id": run_id, "key": "train/loss", "value": 0.25, "step": 5,
                         "timestamp": rows[0]["timestamp"]}]
    finally:
        server.stop()


def test_redact():
    assert tracking.redact("http://user:pw@host:5000/x") == "http://host:5000/x"
    assert tracking.redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.mlflow
def test_experiment_name_from_the_environment_and_standard_tags(mlflow_server, monkeypatch):
    """MLFLOW_EXPERIMENT_NAME replaces the default experiment, as in MLflow; runs carry
    MLflow's user and source tags and the commit the submitting side passed on."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-x")
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "0123abcd")
    run_id = tracking.start_run(mlflow_server.uri, "vit-pretrain", "named", {}, {},
                                source="jobs/pretrain.py")
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "team-x"
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == "0123abcd" == tags["git_commit"]
    assert tags["mlflow.source.name"] == "jobs/pretrain.py"
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')
    job = client.get_run(tracking.start_run(mlflow_server.uri, "x", "job", {}, {}))
    assert job.data.tags["mlflow.source.type"] == "JOB"


def test_vtab_runs_are_named_after_the_pretraining_run_and_step(tmp_path):
    from eval.config import VtabConfig
    from eval.trial import model_label
    from pipeline.config import apply_overrides
    from pipeline.model import ViT
    from pipeline.train.config import smoke
    from pipeline.weights import save_vit

    save_vit(ViT(smoke().model), tmp_path / "step_00000150",
             metadata={"run_name": "b16-augreg", "step": 150})
    assert model_label(str(tmp_path / "step_00000150")) == "b16-augreg-step150"
    assert model_label("hf://google/vit-base-patch16-224@main") == \
        "google-vit-base-patch16-224-main"
    assert model_label(str(tmp_path / "ViT-B_16.npz")) == "ViT-B_16.npz"
    cfg = apply_overrides(VtabConfig(), [f"run.checkpoint={tmp_path / 'step_00000150'}",
                                         f"data.uri={tmp_path}", "sweep.tasks=eurosat"])
    assert cfg.run_name.startswith("vtab-b16-augreg-step150-")


@pytest.mark.slow
@pytest.mark.ray
def test_one_store_whatever_the_storage(ray_local, tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI, pretraining runs whose checkpoints go to a non-default
    --out log to the one local store, where the comparison command finds them. (The
    runs go through `pretrain` on the session's Ray with HOME redirected: what this checks is
    where the store is, not the command line, which test_pretrain_job covers.)"""
    from pipeline.train.config import apply_overrides, smoke
    from pipeline.train.run import pretrain

    home = tmp_path / "home"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    for name, lr in (("store-a", "0.002"), ("store-b", "0.001")):
        cfg = apply_overrides(smoke(), [
            f"run.storage={tmp_path / 'elsewhere'}", f"run.name={name}", f"optim.lr={lr}",
            "train.total_steps=6", "optim.warmup_steps=2", "train.log_every=3",
            "checkpoint.every=6", "probe.every=0", "train.system_metrics_s=0"])
        out = pretrain(cfg)
        assert out.tracking_uri == f"sqlite:///{home / 'vit-runs' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    assert (home / "vit-runs" / "mlflow.db").exists()
    assert not list((tmp_path / "elsewhere").glob("*.db"))
    out = subprocess.run([str(Path(sys.executable).parent / "vit-compare"), "store-a",
                          "store-b", "--no-mlflow"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pretraining runs" in out.stdout and "optim.lr" in out.stdout

    # --no-mlflow (pretrain(mlflow=False)): nothing in the store; the metrics stay in the run
    # folder as a spill, which a later start of the run that logs to MLflow sends.
    from mlflow.tracking import MlflowClient

    cfg = apply_overrides(cfg, ["run.name=store-off"])
    off = pretrain(cfg, mlflow=False)
    assert off.run_id is None and off.step == 6
    client = MlflowClient(f"sqlite:///{home / 'vit-runs' / 'mlflow.db'}")
    logged = {r.info.run_name for e in client.search_experiments()
              for r in client.search_runs([e.experiment_id])}
    assert {"store-a", "store-b"} <= logged and "store-off" not in logged
    spills = list((tmp_path / "elsewhere" / "store-off").glob("pending_metrics-*.jsonl"))
    assert spills and "train/loss" in spills[0].read_text()


@pytest.mark.mlflow
def test_a_tracker_with_flush_every_s_sends_at_most_that_often_and_at_a_checkpoint(
        mlflow_server, tmp_path):
    """Rank 0's tracker (loop.FLUSH_EVERY_S): a log step keeps its metrics unless the last
    send is that old; a checkpoint (`save`) and the end send what is kept."""
    uri = mlflow_server.uri
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("flush")).info.run_id
    t = tracking.Tracker(uri, run, spill_uri=str(tmp_path / "spill"), flush_every_s=3600)
    history = lambda: [(m.step, m.value) for m in client.get_metric_history(run, "train/loss")]  # noqa: E731
    t.log_metrics({"train/loss": 2.0}, step=1)
    assert history() == [(1, 2.0)], "the first is sent at once"
    t.log_metrics({"train/loss": 1.0}, step=2)
    t.log_metrics({"train/loss": 0.5}, step=3)
    assert history() == [(1, 2.0)] and len(t.pending) == 2
    t.save()
    assert sorted(history()) == [(1, 2.0), (2, 1.0), (3, 0.5)] and not t.pending
    t.log_metrics({"train/loss": 0.25}, step=4)
    t.close()
    assert sorted(history())[-1] == (4, 0.25)
    assert not (tmp_path / "spill").exists(), "nothing spilled while the store was there"
