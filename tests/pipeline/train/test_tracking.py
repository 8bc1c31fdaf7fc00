"""MLflow tracking against a real server process: params, metrics, and an outage that must
not stop training nor lose metrics."""

from __future__ import annotations

import json
import logging

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking


@pytest.mark.slow
@pytest.mark.mlflow
def test_outage_buffers_and_flushes(tmp_path, caplog):
    from tests.conftest import MlflowServer

    server = MlflowServer(tmp_path).start()
    try:
        run_id = tracking.start_run(server.uri, "exp-outage", "r1", None,
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
