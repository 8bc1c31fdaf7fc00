"""The model registry and the way back from VTAB-1k to the pretraining run, on a real MLflow
server (no Ray: the runs are made here as pretraining and `vit-vtab` make them)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import registry, tracking

pytestmark = pytest.mark.mlflow


def _pretraining_run(uri: str, experiment: str, name: str, **params) -> str:
    return tracking.start_run(uri, experiment, name, {"optim.lr": 0.001, **params},
                              {"vit.kind": "pretraining"}, source="jobs/pretrain.py")


def test_checkpoints_are_versions_of_the_experiment_s_model(mlflow_server, tmp_path):
    """A local path and an s3:// checkpoint both become versions (a server refuses a local
    path as a source: the source is a logged model with a pointer); one registered model per
    experiment; registering again finds the version; `newest` follows the runs' ends."""
    uri, exp = mlflow_server.uri, f"pre-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(uri)
    name = registry.registered_model_name(exp)
    a = _pretraining_run(uri, exp, "run-a")
    local = str(tmp_path / "runs" / "run-a" / "step_00000150")
    va = registry.register_checkpoint(uri, a, name, local, 150, newest=True)
    assert va.source.startswith("models:/m-") and va.run_id == a
    assert (va.tags["checkpoint"], va.tags["step"]) == (local, "150")
    model = client.get_logged_model(registry.model_id_of(va))
    assert model.source_run_id == a and model.tags["checkpoint"] == local
    from mlflow.artifacts import download_artifacts

    folder = Path(download_artifacts(artifact_uri=model.artifact_location, tracking_uri=uri,
                                     dst_path=str(tmp_path / "ptr")))
    assert [p.name for p in folder.iterdir()] == [registry.POINTER]   # a pointer, no weights
    doc = json.loads((folder / registry.POINTER).read_text())
    assert doc["checkpoint"] == local and doc["step"] == 150 and doc["pretrain_run_id"] == a
    assert [o.model_id for o in client.get_run(a).outputs.model_outputs] == [model.model_id]

    b = _pretraining_run(uri, exp, "run-b")
    vb = registry.register_checkpoint(uri, b, name, "s3://bucket/runs/run-b/step_00000200",
                                      200, newest=True)
    assert (va.name, va.version, vb.name, vb.version) == (name, "1", name, "2")
    assert client.get_model_version_by_alias(name, registry.NEWEST).version == "2"
    again = registry.register_checkpoint(uri, a, name, local, 150)
    assert again.version == "1" and len(client.search_model_versions(f"name = '{name}'")) == 2
    assert registry.registered_model_name("team/x:y", "") == "team-x-y"
    assert registry.registered_model_name("vit-pretrain", "b16") == "b16"


@pytest.mark.parametrize("env", ["unset", "another store"])
def test_a_local_store_registers_and_leaves_the_processs_settings_alone(tmp_path, monkeypatch,
                                                                       env):
    """A SQLite store passed as the argument (pretrain() called directly, a test's store):
    MLflow's registry looks the version's `models:/` source up through the global tracking
    URI, so the version failed and ./mlflow.db appeared; and the command's own setting
    (MLFLOW_TRACKING_URI, or none) must be as it was afterwards, or what the command logs
    next goes to another store."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    other = f"sqlite:///{tmp_path}/other.db"
    if env == "unset":
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    uri = f"sqlite:///{tmp_path}/given.db"
    run = _pretraining_run(uri, "local", "run-l")
    version = registry.register_checkpoint(uri, run, "local-model", str(tmp_path / "c"), 10)
    assert str(version.version) == "1" and version.run_id == run
    assert not (tmp_path / "mlflow.db").exists()
    import os

    assert os.environ.get("MLFLOW_TRACKING_URI") == (None if env == "unset" else other)
    assert mlflow.get_tracking_uri() != uri and tracking.default_tracking_uri() != uri


def test_vtab_results_flow_back_into_the_pretraining_run(mlflow_server):
    """The VTAB run gets the pretraining config as pretrain.* params, the checkpoint's
    version as its model input and a link; its summary goes into the pretraining run at the
    checkpoint's step and onto the version; best-vtab moves only for a comparable result that
    is better, or one over more tasks."""
    uri, exp = mlflow_server.uri, f"pre-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(uri)
    pre = _pretraining_run(uri, exp, "run-c", **{"model.depth": 12,
                                                 "AWS_SECRET_ACCESS_KEY": "nope"})
    name = registry.registered_model_name(exp)
    registry.register_checkpoint(uri, pre, name, "/ckpt/run-c/step_00000300", 300, newest=True)
    client.set_tag(pre, "registered_model", f"{name}/1")
    vtab = tracking.start_run(uri, f"vtab-{exp}", "vtab-run-c-step100-abcd1234", {}, {})
    registry.link_to_pretraining(uri, vtab, pre, "/ckpt/run-c/step_00000100", 100)
    run = client.get_run(vtab)
    assert run.data.params["pretrain.optim.lr"] == "0.001"
    assert run.data.params["pretrain.model.depth"] == "12"
    assert run.data.params["pretrain.step"] == "100"
    assert not any("SECRET" in k for k in run.data.params)
    pre_run = client.get_run(pre)
    link = f"(#/experiments/{pre_run.info.experiment_id}/runs/{pre})"
    assert f"[run-c]{link}" in run.data.tags["mlflow.note.content"]
    v100 = registry.checkpoint_version(client, name, pre, 100)     # registered by the link
    assert v100.tags["checkpoint"] == "/ckpt/run-c/step_00000100"
    assert [m.model_id for m in run.inputs.model_inputs] == [registry.model_id_of(v100)]
    assert run.data.tags["registered_model"] == f"{name}/{v100.version}"

    summary = {"natural": 60.0, "mean": 70.0, "mean_of_groups": 71.0}
    tasks = {"cifar100": 60.0, "eurosat": 80.0}
    assert registry.log_vtab_to_pretraining(uri, pre, "/ckpt/run-c/step_00000100", 100,
                                            summary, tasks, "vit", vtab)
    history = client.get_metric_history(pre, "vtab/mean")
    assert [(m.step, m.value) for m in history] == [(100, 70.0)]
    assert client.get_metric_history(pre, "vtab/eurosat/top1")[0].step == 100
    model = client.get_logged_model(registry.model_id_of(v100))
    assert {m.key for m in model.metrics} >= {"vtab/mean", "vtab/cifar100/top1"}
    tags = client.get_model_version(name, v100.version).tags
    assert (tags["vtab.mean"], tags["vtab.mean_of_groups"], tags["vtab.protocol"],
            tags["vtab.tasks"], tags["vtab.run_id"]) == ("70.0000", "71.0000", "vit",
                                                         "cifar100,eurosat", vtab)
    assert client.get_model_version_by_alias(name, registry.BEST_VTAB).version == v100.version

    # The final checkpoint: worse under the same protocol and tasks -> the alias stays;
    # better -> it moves; another protocol is not compared; more tasks win.
    final = "/ckpt/run-c/step_00000300"
    assert not registry.log_vtab_to_pretraining(uri, pre, final, 300, {"mean": 65.0}, tasks,
                                                "vit")
    assert not registry.log_vtab_to_pretraining(uri, pre, final, 300, {"mean": 90.0}, tasks,
                                                "paper")
    assert registry.log_vtab_to_pretraining(uri, pre, final, 300, {"mean": 75.0}, tasks, "vit")
    assert client.get_model_version_by_alias(name, registry.BEST_VTAB).version == "1"
    assert not registry.log_vtab_to_pretraining(uri, pre, "/ckpt/run-c/step_00000100", 100,
                                                {"mean": 99.0}, {"eurosat": 99.0}, "vit")
    assert registry.log_vtab_to_pretraining(uri, pre, "/ckpt/run-c/step_00000100", 100,
                                            {"mean": 50.0}, {**tasks, "kitti": 10.0}, "vit")
    assert sorted((m.step, m.value) for m in client.get_metric_history(pre, "vtab/mean")) == [
        (100, 50.0), (100, 70.0), (100, 99.0), (300, 65.0), (300, 75.0), (300, 90.0)]


def test_experiments_open_on_the_model_training_view(mlflow_server):
    """MLflow 3 opens an experiment without a kind on its GenAI pages: ours say
    custom_model_development, created or found; a kind someone chose is kept."""
    uri, exp = mlflow_server.uri, f"kind-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(uri)
    tracking.start_run(uri, exp, "r", {}, {})
    assert client.get_experiment_by_name(exp).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    old = client.create_experiment(f"{exp}-old")
    tracking.experiment_id(client, f"{exp}-old", uri)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    client.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")
    tracking.experiment_id(client, f"{exp}-old", uri)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"


@pytest.mark.parametrize("uri, kind", [("/data/shards", "local"),
                                       ("s3://bucket/shards", "s3"),
                                       ("https://host/shards", "http")])
def test_dataset_inputs_have_the_source_type_of_their_uri(mlflow_server, uri, kind):
    run = tracking.start_run(mlflow_server.uri, "datasets", f"d-{kind}", {}, {})
    tracking.log_dataset(mlflow_server.uri, run, f"{uri}#train", uri, "ab" * 20)
    (dataset,) = MlflowClient(mlflow_server.uri).get_run(run).inputs.dataset_inputs
    assert dataset.dataset.source_type == kind and dataset.dataset.digest == ("ab" * 18)
    assert json.loads(dataset.dataset.source)[{"http": "url"}.get(kind, "uri")] == uri


def test_measured_constants_are_params_and_restarts_a_tag(mlflow_server):
    """images_per_step is a param, unless it changes (then a metric, from the change); each
    (re)start's step is appended to the tag start_steps."""
    run = tracking.start_run(mlflow_server.uri, "constants", "c", {}, {})
    client = MlflowClient(mlflow_server.uri)
    t = tracking.Tracker(mlflow_server.uri, run)
    t.note_start(0)
    t.log_metrics({"train/loss": 2.0, "train/images_per_step": 32.0}, 10)
    t.log_metrics({"train/loss": 1.0, "train/images_per_step": 32.0}, 20)
    t.note_start(20)
    got = client.get_run(run)
    assert got.data.params["images_per_step"] == "32"
    assert "train/images_per_step" not in got.data.metrics
    assert tracking.start_steps(got) == [0, 20]
    t.log_metrics({"train/loss": 0.5, "train/images_per_step": 30.0}, 30)
    assert [(m.step, m.value) for m in client.get_metric_history(
        run, "train/images_per_step")] == [(30, 30.0)]


def test_vtab_task_runs_hold_their_trials_curves_and_data(mlflow_server):
    """Under the VTAB parent: one run per task with its data as a dataset input, and under
    it one run per trial with loss, lr and val200 top-1 over steps, timed as it ran; a
    second attempt at logging duplicates nothing."""
    uri, client = mlflow_server.uri, MlflowClient(mlflow_server.uri)
    parent = tracking.start_run(uri, f"vtab-{uuid.uuid4().hex[:6]}", "vtab-x-step40-0123abcd",
                                {}, {})
    curve = {"step": [10, 20, 30, 40], "loss": [2.0, 1.5, 1.2, 1.0],
             "lr": [0.01, 0.008, 0.004, 0.0], "val_step": [20, 40], "val_top1": [30.0, 50.0]}
    trial = {"task": "eurosat", "seed": 0, "top1": 50.0, "diverged": False,
             "started_at": 1_700_000_000.0, "finished_at": 1_700_000_100.0, "curve": curve}
    doc = {"tasks": [{"task": "eurosat", "group": "specialized", "num_classes": 10,
                      "lr": 0.01, "val200": {"0.01": 50.0, "0.1": 20.0}, "top1": 70.0,
                      "seeds": [70.0]}],
           "summary": {"specialized": 70.0, "mean": 70.0}, "summary_std": {},
           "settings": {"steps": 40, "batch_size": 16},
           "trials": [{**trial, "phase": "select", "lr": 0.01},
                      {**trial, "phase": "select", "lr": 0.1, "top1": 20.0},
                      {**trial, "phase": "final", "lr": 0.01, "top1": 70.0,
                       "curve": {**curve, "val_step": [], "val_top1": []}}]}
    for _ in range(2):
        tracking.log_vtab_results(uri, parent, doc, {"eurosat": "/data/vtab-1k/eurosat"})
    exp = client.get_run(parent).info.experiment_id
    (task,) = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert task.info.run_name == "vtab-x-step40-0123abcd/eurosat"
    (data,) = task.inputs.dataset_inputs
    assert (data.dataset.name, data.dataset.source_type) == ("vtab-1k/eurosat", "local")
    assert json.loads(data.dataset.source)["uri"] == "/data/vtab-1k/eurosat"
    trials = {r.info.run_name.rsplit("/", 1)[1]: r for r in client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{task.info.run_id}'")}
    assert sorted(trials) == ["final-lr0.01-seed0", "select-lr0.01-seed0",
                              "select-lr0.1-seed0"]
    select = trials["select-lr0.01-seed0"]
    assert (select.info.start_time, select.info.end_time) == (1_700_000_000_000,
                                                              1_700_000_100_000)
    assert (task.info.start_time, task.info.end_time) == (1_700_000_000_000, 1_700_000_100_000)

    def series(run, key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(
            run.info.run_id, key), key=lambda m: m.step)]

    assert series(select, "train/loss") == list(zip(curve["step"], curve["loss"], strict=True))
    assert series(select, "train/lr") == list(zip(curve["step"], curve["lr"], strict=True))
    assert series(select, "val200/top1") == [(20, 30.0), (40, 50.0)]
    assert series(trials["final-lr0.01-seed0"], "top1") == [(40, 70.0)]
    assert select.data.params["lr"] == "0.01" and select.data.params["phase"] == "select"


def test_runs_starting_and_finishing_together_share_one_experiment_and_model(mlflow_server):
    """Two jobs submitted together (the demo does; a team's cluster does) race to create
    the experiment and its dataset row (same data) and, at their ends, the registered model:
    every racer gets the same one and none fails."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    uri, exp = mlflow_server.uri, f"race-{uuid.uuid4().hex[:6]}"
    n = 6
    gate = Barrier(n)

    def start(i):
        gate.wait()
        run_id = _pretraining_run(uri, exp, f"run-{i}")
        tracking.log_dataset(uri, run_id, "shards#train", "/data/shards", "d1g35t")
        return run_id

    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(start, range(n)))
    client = MlflowClient(uri)
    assert len({client.get_run(r).info.experiment_id for r in runs}) == 1
    for run_id in runs:
        (logged,) = client.get_run(run_id).inputs.dataset_inputs
        assert logged.dataset.name == "shards#train"
    name = registry.registered_model_name(exp)

    n = 3                    # fewer: each registration is several requests
    gate = Barrier(n)

    def register(i):
        gate.wait()
        return registry.register_checkpoint(uri, runs[i], name, f"/ckpt/run-{i}/step_10", 10)

    with ThreadPoolExecutor(n) as pool:
        versions = list(pool.map(register, range(n)))
    assert sorted(int(v.version) for v in versions) == list(range(1, n + 1))
