"""Metrics logged while MLflow was down at start are kept in the run folder and sent by the
next start of the run (a real MLflow server). The same through `vit-pretrain` on Ray:
tests/jobs/test_pretrain_preflight.py (MLflow down at the first start, up at the next)."""

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
