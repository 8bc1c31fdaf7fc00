"""`eval/compare.py` over real MLflow runs made here, on a real MLflow server."""

from __future__ import annotations

import csv
import uuid

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from eval.compare import CompareError, compare, main

pytestmark = pytest.mark.mlflow


def _run(client, experiment, name, params, metrics, histories=()):
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=name)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    for key, values in histories:
        client.log_batch(run.info.run_id, metrics=[Metric(key, v, 0, s)
                                                   for s, v in enumerate(values)])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.mark.slow
def test_vtab_and_pretraining_runs_side_by_side(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    tag = uuid.uuid4().hex[:6]
    vtab_exp = f"vtab-{tag}"
    a = _run(client, vtab_exp, f"eval-a-{tag}", {"checkpoint": "a"},
             {"vtab/eurosat/top1": 90.0, "vtab/kitti/top1": 60.0, "vtab/specialized": 90.0,
              "vtab/structured": 60.0, "vtab/mean": 75.0, "vtab/mean_of_groups": 75.0})
    b = _run(client, vtab_exp, f"eval-b-{tag}", {"checkpoint": "b"},
             {"vtab/eurosat/top1": 92.5, "vtab/kitti/top1": 55.0, "vtab/specialized": 92.5,
              "vtab/structured": 55.0, "vtab/mean": 73.75, "vtab/mean_of_groups": 73.75})
    p1 = _run(client, f"pre-{tag}", f"pre-1-{tag}", {"optim.lr": "0.001", "model.depth": "2"},
              {"train/loss": 0.5, "fewshot/val/5shot": 0.8},
              [("train/loss", [2.0, 1.0, 0.5]), ("perf/images_per_sec", [100.0, 300.0])])
    p2 = _run(client, f"pre-{tag}", f"pre-2-{tag}", {"optim.lr": "0.003", "model.depth": "2"},
              {"fewshot/val/5shot": 0.9},
              [("train/loss", [2.0, 0.7, 0.25, 0.2]), ("perf/images_per_sec", [150.0])])

    # ids, names and an experiment, mixed
    out = compare(mlflow_server.uri, [a, f"pre-1-{tag}", p2], experiment=None,
                  out_dir=tmp_path / "c1", log=False)
    assert out["run_id"] is None
    out = compare(mlflow_server.uri, [f"pre-1-{tag}", p2], experiment=vtab_exp,
                  out_dir=tmp_path / "c2")
    text = out["text"]
    assert "eurosat" in text and "92.50 (+2.50)" in text and "55.00 (-5.00)" in text
    assert "73.75 (-1.25)" in text                      # mean of the tasks, delta to run a
    assert "optim.lr" in text and "model.depth" not in text     # only differing config
    rows = list(csv.reader(out["csv"].open()))
    assert rows[0] == ["vtab", a, b]
    assert ["eurosat", "90.0", "92.5"] in rows
    loss = next(r for r in rows if r[0] == "final loss")
    assert loss[1:] == ["0.5", "0.2"]                  # the value at the last step
    speed = next(r for r in rows if r[0] == "images/s")
    assert [float(x) for x in speed[1:]] == [200.0, 150.0]     # mean over the history
    steps = next(r for r in rows if r[0] == "steps")
    assert steps[1:] == ["2", "3"]
    assert out["png"].read_bytes()[:4] == b"\x89PNG"

    logged = client.get_run(out["run_id"])
    assert logged.data.tags["compared_runs"] == ",".join([p1, p2, a, b])
    assert {a.path for a in client.list_artifacts(out["run_id"])} == {
        "comparison.txt", "comparison.csv", "comparison.png"}


def test_unknown_runs_are_one_line_errors(mlflow_server, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert main(["no-such-run", "other", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no MLflow run with id or name 'no-such-run' in " \
                  f"{mlflow_server.uri}; list them with `mlflow runs list` or the MLflow UI"
    with pytest.raises(CompareError, match="no MLflow experiment 'nope'"):
        compare(mlflow_server.uri, [], experiment="nope", log=False)


def test_runs_by_unique_prefix(mlflow_server, tmp_path):
    """A name's start finds the one top-level run it begins; one that begins several names
    says which, in one line."""
    client = MlflowClient(mlflow_server.uri)
    tag = uuid.uuid4().hex[:6]
    one = _run(client, f"p-{tag}", f"vtab-{tag}-alpha-0123abcd", {}, {"vtab/mean": 1.0})
    two = _run(client, f"p-{tag}", f"vtab-{tag}-beta-4567ef01", {}, {"vtab/mean": 2.0})
    _run(client, f"p-{tag}", f"vtab-{tag}-beta-89abcdef", {}, {"vtab/mean": 3.0})
    out = compare(mlflow_server.uri, [f"vtab-{tag}-al", f"vtab-{tag}-beta-45"],
                  out_dir=tmp_path, log=False)
    assert out["csv"].read_text().splitlines()[0] == f"vtab,{one},{two}"
    with pytest.raises(CompareError, match=f"'vtab-{tag}-beta' begins the names of 2 runs"):
        compare(mlflow_server.uri, [f"vtab-{tag}-beta", one], log=False)
