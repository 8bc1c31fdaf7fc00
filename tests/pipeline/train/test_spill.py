"""Metrics logged while MLflow was down at start are kept in the run folder and sent by the
next start of the run (a real MLflow server; the pretraining part on a local Ray)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking

pytestmark = [pytest.mark.mlflow]


def test_a_run_without_mlflow_spills_and_the_next_start_imports(tmp_path, mlflow_server):
    run_uri = str(tmp_path / "run")
    offline = tracking.Tracker(mlflow_server.uri, None, spill_uri=run_uri)
    for step in (5, 10):
        offline.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    offline.save()                    # a checkpoint: what it covers is on disk now
    offline.log_metrics({"train/loss": 0.05}, 15)
    offline.close()
    spills = sorted((tmp_path / "run").glob("pending_metrics-*.jsonl"))
    assert len(spills) == 2
    rows = [json.loads(x) for f in spills for x in f.read_text().splitlines()]
    assert {r["run_id"] for r in rows} == {None}

    run_id = tracking.start_run(mlflow_server.uri, "spills", "offline-run", {}, {})
    client = MlflowClient(mlflow_server.uri)
    client.log_metric(run_id, "train/loss", 0.2, step=5)     # already there: not twice
    assert tracking.import_spills(mlflow_server.uri, run_id, run_uri) == 4
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert loss == [(5, 0.2), (10, 0.1), (15, 0.05)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/lr")) == [5, 10]
    assert list((tmp_path / "run").glob("pending_metrics-*")) == []
    assert tracking.import_spills(mlflow_server.uri, run_id, run_uri) == 0


@pytest.mark.slow
@pytest.mark.ray
def test_pretraining_with_mlflow_down_at_start_loses_no_metric(ray_local, tmp_path,
                                                               mlflow_server):
    from pipeline.train.config import apply_overrides, smoke
    from pipeline.train.run import pretrain
    from tests.conftest import free_port

    cfg = apply_overrides(smoke(), ["run.name=offline", f"run.storage={tmp_path / 'runs'}",
                                    "train.total_steps=20", "train.log_every=5",
                                    "checkpoint.every=10", "probe.every=0",
                                    "train.system_metrics_s=0"])
    down = f"http://127.0.0.1:{free_port()}"       # nothing listens there
    first = pretrain(cfg, tracking_uri=down)
    assert first.step == 20 and first.run_id is None
    assert list((tmp_path / "runs" / "offline").glob("pending_metrics-*.jsonl"))
    # The same command once the server is reachable: nothing to train, the metrics are sent.
    second = pretrain(cfg, tracking_uri=mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    steps = sorted(m.step for m in client.get_metric_history(second.run_id, "train/loss"))
    assert steps == [5, 10, 15, 20]
    assert list((tmp_path / "runs" / "offline").glob("pending_metrics-*")) == []
