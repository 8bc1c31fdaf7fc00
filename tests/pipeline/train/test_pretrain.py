"""Pretraining end to end on a local Ray cluster: 2 CPU workers over gloo, shards and
checkpoints on the S3 test endpoint, a real MLflow server; resume, a non-finite loss, the
effective global batch. (Killed workers and drivers: test_restarts.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data import shards
from pipeline.tracking import start_steps
from pipeline.train.config import apply_overrides, smoke
from pipeline.train.run import PretrainError, pretrain
from pipeline.weights import load_vit
from tests.conftest import sqlite_store

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def cfg_for(tmp_path, name, *sets):
    return apply_overrides(smoke(), [f"run.name={name}", f"run.storage={tmp_path / 'runs'}",
                                     *sets])


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.s3
@pytest.mark.mlflow
def test_two_workers_from_s3_into_mlflow(ray_local, s3, mlflow_server, tmp_path):
    data = f"s3://{s3}/data/synth"
    shards.write_shards(shards.grating_images(num_samples=640, num_classes=4, image_size=32,
                                              val_fraction=0.2),
                        data, shards.ShardOptions(shard_size_mb=0.05), log=lambda m: None)
    cfg = cfg_for(tmp_path, "two-workers", "data.source=shards", f"data.uri={data}",
                  "data.augment=resize", f"run.storage=s3://{s3}/runs", "scale.num_workers=2",
                  "train.total_steps=60", "train.global_batch_size=32", "train.log_every=10",
                  "checkpoint.every=30", "probe.every=30",
                  "train.system_metrics_s=1")
    out = pretrain(cfg, tracking_uri=mlflow_server.uri)

    assert out.step == 60 and out.checkpoint.startswith(f"s3://{s3}/runs/two-workers/step_")
    model = load_vit(out.checkpoint)                    # eval/vtab.py takes it as it is
    assert model.cfg == cfg.model
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(out.run_id)
    params = run.data.params
    assert set(cfg.flat()) <= set(params), "every resolved config value is a param"
    assert params["train.global_batch_size"] == "32" and params["scale.num_workers"] == "2"
    loss = [v for _, v in history(client, out.run_id, "train/loss")]
    assert len(loss) == 6 and loss[-1] < 0.6 * loss[0], f"loss falls: {loss}"
    for key in ("train/lr", "train/grad_norm", "perf/images_per_sec", "perf/data_wait_frac",
                "fewshot/val/1shot", "fewshot/val/5shot"):
        assert history(client, out.run_id, key), key
    assert [v for _, v in history(client, out.run_id, "data/skipped_samples")] == [0.0] * 6
    # The batch that really went into each step: measured, constant, so a param.
    assert params["images_per_step"] == "32" and "train/images_per_step" not in run.data.metrics
    tags = run.data.tags
    assert tags["git_commit"] and "2 workers" in tags["cluster"]
    assert tags["data_manifest"].startswith(data + " sha256:")
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.json", "checkpoint_uri.txt"} <= artifacts
    text = Path(client.download_artifacts(out.run_id, "checkpoint_uri.txt", str(tmp_path)))
    assert text.read_text().strip() == out.checkpoint
    everything = json.dumps([params, tags])
    assert "testing-secret" not in everything and "testing" not in params.values()
    assert run.info.status == "FINISHED"

    # MLflow's conventions. Standard tags: user, source, git commit (this checkout's).
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert tags["mlflow.user"] and tags["mlflow.source.name"] == "jobs/pretrain.py"
    assert tags["mlflow.source.type"] in ("LOCAL", "JOB")
    assert tags["mlflow.source.git.commit"].startswith(head)
    # The training data as a dataset input: its URI and the manifest's digest.
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.source_type == "s3"
    assert json.loads(inputs[0].dataset.source)["uri"] == data
    assert inputs[0].dataset.digest == tags["data_manifest"].rsplit("sha256:", 1)[1]
    assert {(t.key, t.value) for t in inputs[0].tags} == {("mlflow.data.context", "training")}
    # The final checkpoint as a version of the experiment's registered model, through a
    # logged model (the server takes no checkpoint path as a source), alias `newest`.
    versions = client.search_model_versions(f"run_id = '{out.run_id}'")
    assert [(v.name, v.tags["checkpoint"], v.tags["step"]) for v in versions] == [
        ("vit-smoke", out.checkpoint, "60")]
    assert versions[0].source.startswith("models:/m-")
    assert tags["registered_model"] == f"vit-smoke/{versions[0].version}"
    assert client.get_model_version_by_alias("vit-smoke", "newest").version == \
        versions[0].version
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    # System metrics of the node (one node here), under system/node_0/.
    system = [k for k in run.data.metrics if k.startswith("system/node_0/")]
    assert "system/node_0/cpu_utilization_percentage" in system, sorted(run.data.metrics)


@pytest.mark.mlflow
def test_learns_under_randaugment_mixup_and_stochastic_depth(ray_local, mlflow_server,
                                                             tmp_path):
    """The AugReg regularisers together (RandAugment(2, 10), Mixup 0.2, stochastic depth 0.1)
    on the smoke run: the loss still falls and the few-shot probe is far above chance (0.1)."""
    cfg = cfg_for(tmp_path, "augreg", "data.randaug_layers=2", "data.randaug_magnitude=10",
                  "data.mixup=0.2", "model.drop_path=0.1", "train.log_every=25")
    out = pretrain(cfg, tracking_uri=mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    loss = [v for _, v in history(client, out.run_id, "train/loss")]
    assert len(loss) == 6 and loss[-1] < 0.92 * loss[0], f"loss falls: {loss}"
    assert out.metrics["fewshot/synthetic/1shot"] > 0.3, out.metrics
    assert out.metrics["fewshot/synthetic/5shot"] > 0.4, out.metrics
    params = client.get_run(out.run_id).data.params
    assert (params["data.randaug_layers"], params["data.mixup"], params["model.drop_path"]) == (
        "2", "0.2", "0.1")


@pytest.mark.mlflow
def test_resume_continues_the_run(ray_local, mlflow_server, tmp_path):
    # One worker with gradient accumulation: 4 micro-batches of 16 make the global 64.
    first = pretrain(cfg_for(tmp_path, "resume", "train.total_steps=20",
                             "checkpoint.every=10", "train.micro_batch_size=16",
                             "train.log_every=5"), tracking_uri=mlflow_server.uri)
    assert first.step == 20
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(first.run_id).data.params["images_per_step"] == "64"

    # The same command with a longer schedule continues the same run from step 20.
    second = pretrain(cfg_for(tmp_path, "resume", "train.total_steps=30",
                              "checkpoint.every=10", "train.micro_batch_size=16",
                              "train.log_every=5"), tracking_uri=mlflow_server.uri)
    assert second.run_id == first.run_id and second.step == 30
    assert start_steps(client.get_run(first.run_id)) == [0, 20]
    steps = [s for s, _ in history(client, first.run_id, "train/loss")]
    assert steps == [5, 10, 15, 20, 25, 30], "no step trained twice"
    state = json.loads((Path(second.checkpoint) / "train_state.json").read_text())
    assert state["step"] == 30 and state["samples_seen"] == 30 * 64

    # --resume: a new run that starts from another run's training checkpoint.
    third = pretrain(cfg_for(tmp_path, "from-resume", "train.total_steps=25",
                             "checkpoint.every=25"),
                     resume=first.checkpoint, tracking_uri=mlflow_server.uri)
    assert third.run_id != first.run_id and third.step == 25
    assert start_steps(client.get_run(third.run_id)) == [20]


def test_non_finite_loss_stops_with_the_step(ray_local, tmp_path):
    cfg = cfg_for(tmp_path, "nan", "optim.lr=1e36", "optim.warmup_steps=0",
                  "train.total_steps=50", "probe.every=0")
    with pytest.raises(PretrainError, match=r"non-finite loss at step 2: loss nan.*lower optim.lr"):
        pretrain(cfg, tracking_uri=sqlite_store(tmp_path / "m.db"))
