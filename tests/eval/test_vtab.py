"""`eval/vtab.py` end to end on generated tasks in the exact VTAB-1k layout: from a checkpoint
written by `jobs/pretrain.py --preset smoke`, on local Ray, into a real MLflow server; a
killed driver resumes; bad input fails before any trial. Through `ray job submit` to a
running head: the demo's two VTAB jobs (tests/jobs/test_demo.py)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from eval.data import write_grating_task
from eval.tasks import BY_NAME
from eval.vtab import main
from pipeline.model import ViT, ViTConfig
from pipeline.weights import save_vit
from tests.conftest import sqlite_store, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
# Three tasks of the three groups, with 10, 4 and 16 classes; KITTI takes no random crop,
# dSprites-orientation no flip.
TASKS = ("eurosat", "kitti", "dsprites_ori")


def make_tasks(root: Path, tasks=TASKS, **sizes) -> Path:
    for i, name in enumerate(tasks):
        write_grating_task(root, BY_NAME[name], seed=i, **sizes)
    return root


def run_vtab(args: list[str], env_extra: dict | None = None, timeout: float = 600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "eval" / "vtab.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


VTAB_MODEL = "vtab-test-model"


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory, mlflow_server):
    """A checkpoint from `jobs/pretrain.py --preset smoke` (32 px, patch 8), logged to the
    MLflow server; -> (checkpoint path, pretraining run id)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}   # this tree's code
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--preset",
                          "smoke", "--name", "for-vtab", "--out", str(tmp),
                          "--set", "train.total_steps=40", "--set", "probe.every=0",
                          # A model of its own: other tests' runs in this session's server
                          # (the handoff's, in experiment vit-smoke) move vit-smoke's aliases.
                          "--set", f"run.registered_model={VTAB_MODEL}"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("vit-smoke")
    run = client.search_runs([exp.experiment_id], "tags.`vit.run_name` = 'for-vtab'")[0]
    return tmp / "for-vtab" / "step_00000040", run.info.run_id


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow
def test_whole_protocol_from_a_smoke_checkpoint(smoke_checkpoint, mlflow_server, tmp_path):
    checkpoint, pretrain_run = smoke_checkpoint
    # 40 validation images a task: with 10, the two rates' val200 means tied now and then
    # (30.0 = 30.0), and the choice fell on the rate too low for 40 steps.
    data = make_tasks(tmp_path / "vtab-1k", val=40)
    out = run_vtab(["--checkpoint", str(checkpoint), "--data", str(data),
                    "--tasks", ",".join(TASKS), "--resolution", "48",   # 32 -> 48 px
                    "--lrs", "0.001,0.03", "--steps", "40", "--batch-size", "16",
                    "--seeds", "2", "--out", str(tmp_path / "evals"), "--name", "e2e",
                    "--reference", "vit-l16-i21k"],
                   {"MLFLOW_TRACKING_URI": mlflow_server.uri})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    # One line per finished trial and a heartbeat; none of Tune's boxes or hints.
    for noise in ("Configuration for experiment", "╭", "tensorboard --logdir",
                  "Wrote the latest version"):
        assert noise not in log, noise
    report = json.loads((tmp_path / "evals" / "e2e" / "vtab.json").read_text())

    # Selection: 3 tasks x 2 rates on val200, then 3 tasks x 2 seeds on test.
    select = [t for t in report["trials"] if t["phase"] == "select"]
    final = [t for t in report["trials"] if t["phase"] == "final"]
    assert sorted((t["task"], t["lr"]) for t in select) == sorted(
        (task, lr) for task in TASKS for lr in (0.001, 0.03))
    assert sorted((t["task"], t["seed"]) for t in final) == sorted(
        (task, s) for task in TASKS for s in (0, 1))
    # `vit` protocol: the one rate with the best mean val200 score, used for every task.
    mean = {lr: sum(t["top1"] for t in select if t["lr"] == lr) / 3 for lr in (0.001, 0.03)}
    best = max(mean, key=mean.get)
    assert mean[0.03] != mean[0.001]
    assert {t["lr"] for t in final} == {best}
    assert {row["lr"] for row in report["tasks"]} == {best}
    # The report's numbers are the trials' numbers, aggregated as documented.
    rows = {row["task"]: row for row in report["tasks"]}
    for task in TASKS:
        seeds = sorted((t for t in final if t["task"] == task), key=lambda t: t["seed"])
        assert rows[task]["seeds"] == [t["top1"] for t in seeds]
        assert rows[task]["top1"] == pytest.approx(sum(rows[task]["seeds"]) / 2)
    assert report["summary"]["mean"] == pytest.approx(
        sum(rows[t]["top1"] for t in TASKS) / 3)
    assert "natural" not in report["summary"]            # no natural task evaluated
    assert report["summary"]["specialized"] == pytest.approx(rows["eurosat"]["top1"])
    assert report["summary"]["structured"] == pytest.approx(
        (rows["kitti"]["top1"] + rows["dsprites_ori"]["top1"]) / 2)
    # Generated tasks are learnable: clearly better than chance after 40 steps.
    for task in TASKS:
        assert rows[task]["top1"] > 1.5 * 100 / BY_NAME[task].num_classes, rows[task]

    # The terminal table, CSV and PNG.
    assert "Mean of tasks (ViT Table 9 \"Mean\")" in out.stdout
    assert "Mean of the group means (PETL papers)" in out.stdout
    assert "vit-l16-i21k" in out.stdout and "95.60" in out.stdout     # EuroSAT reference
    # A sweep set on the command line is not the reference's protocol: both are named.
    assert report["settings"]["protocol"] == "vit"
    assert report["reference"]["protocol"].startswith("paper: lr 0.01, 2500 steps, mean of 3")
    assert report["reference"]["same_protocol"] is False
    assert "ours used protocol vit, not the reference's" in out.stdout
    # The smoke model is no paper variant: vit_jax's fine-tuning dropout for it is 0.
    assert report["settings"]["dropout"] == 0.0
    csv_lines = (tmp_path / "evals" / "e2e" / "vtab.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,group,lr,val200,top1,std")
    assert len(csv_lines) == 1 + 3 + 4          # header, tasks, 2 groups + 2 means
    assert (tmp_path / "evals" / "e2e" / "vtab.png").read_bytes()[:4] == b"\x89PNG"

    # MLflow: the parent with the metrics, linked to the pretraining run; nested runs.
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("vtab")
    parent = client.search_runs([exp.experiment_id], "tags.`vit.run_name` = 'e2e'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["checkpoint"] == str(checkpoint)
    assert parent.data.tags["pretrain_run_id"] == pretrain_run
    for task in TASKS:
        assert parent.data.metrics[f"vtab/{task}/top1"] == pytest.approx(rows[task]["top1"])
    for key in ("specialized", "structured", "mean", "mean_of_groups"):
        assert parent.data.metrics[f"vtab/{key}"] == pytest.approx(report["summary"][key])
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["vtab.task"] for c in children) == sorted(TASKS)
    for child in children:
        task = child.data.tags["vtab.task"]
        # One key for every task, so MLflow's compare view has a common top1 column.
        assert child.data.metrics["top1"] == pytest.approx(rows[task]["top1"])
        assert child.data.params["lr"] == f"{best:g}" and child.data.params["task"] == task
        assert child.info.run_name == f"e2e/{task}"
        assert child.data.tags["mlflow.user"] == parent.data.tags["mlflow.user"]
    # MLflow's standard tags on the parent.
    assert parent.data.tags["mlflow.source.name"] == "eval/vtab.py"
    assert parent.data.tags["mlflow.source.type"] in ("LOCAL", "JOB")
    assert parent.data.tags["mlflow.user"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"vtab.txt", "vtab.csv", "vtab.json", "vtab.png", "config.json"} <= artifacts
    # The resolved config, as --config reads it back.
    from eval.config import VtabConfig

    logged = VtabConfig.from_dict(json.loads(Path(client.download_artifacts(
        parent.info.run_id, "config.json", str(tmp_path))).read_text()))
    assert (logged.run.name, logged.finetune.steps, logged.sweep.lrs, logged.sweep.tasks) == (
        "e2e", 40, (0.001, 0.03), TASKS)
    assert "testing-secret" not in json.dumps(parent.data.params)

    # Each trial is a run under its task's run: fine-tuning loss and lr over steps, val200
    # top-1 at each report while selecting, timed as it ran.
    for child in children:
        trials = {r.info.run_name.rsplit("/", 1)[1]: r for r in client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{child.info.run_id}'")}
        assert sorted(trials) == sorted([f"select-lr{lr:g}-seed0" for lr in (0.001, 0.03)] +
                                        [f"final-lr{best:g}-seed{s}" for s in (0, 1)])
        for name, trial in trials.items():
            loss = client.get_metric_history(trial.info.run_id, "train/loss")
            assert len(loss) == 40 and trial.data.metrics["train/lr"] >= 0, name
            assert trial.info.end_time - trial.info.start_time > 100, "timed as it ran"
        val = client.get_metric_history(trials[f"select-lr{best:g}-seed0"].info.run_id,
                                        "val200/top1")
        assert sorted(m.step for m in val) == [10, 20, 30, 40]
        (data,) = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert data.dataset.source_type == "local"

    # Where pretraining and evaluation meet: the VTAB run carries the pretraining config and
    # the checkpoint's registered version as its model input; the pretraining run holds the
    # VTAB result at the checkpoint's step; the version holds it as tags, and best-vtab.
    assert parent.data.params["pretrain.train.total_steps"] == "40"
    assert parent.data.params["pretrain.run.name"] == "for-vtab"
    pre = client.get_run(pretrain_run)
    assert f"[for-vtab](#/experiments/{pre.info.experiment_id}/runs/{pretrain_run})" in \
        parent.data.tags["mlflow.note.content"]
    version = client.get_model_version_by_alias(VTAB_MODEL, "best-vtab")
    assert version.run_id == pretrain_run and version.tags["step"] == "40"
    assert version.tags["checkpoint"] == str(checkpoint)
    assert client.get_model_version_by_alias(VTAB_MODEL, "newest").version == version.version
    assert float(version.tags["vtab.mean"]) == pytest.approx(report["summary"]["mean"], abs=1e-3)
    assert version.tags["vtab.protocol"] == "vit" and version.tags["vtab.tasks"] == \
        ",".join(TASKS) and version.tags["vtab.run_id"] == parent.info.run_id
    inputs = client.get_run(parent.info.run_id).inputs        # search_runs leaves models out
    assert [m.model_id for m in inputs.model_inputs] == [version.source[len("models:/"):]]
    assert [(m.step, round(m.value, 4)) for m in client.get_metric_history(
        pretrain_run, "vtab/mean")] == [(40, round(report["summary"]["mean"], 4))]

    # The comparison finds both by the start of their names, and shows the pretraining run's
    # VTAB mean beside its loss.
    from eval.compare import compare

    compared = compare(mlflow_server.uri, ["e2", "for-vt"], out_dir=tmp_path / "cmp", log=False)
    rows = {r[0]: r[1:] for r in csv.reader(compared["csv"].open())}
    assert rows["vtab"] == [parent.info.run_id] and rows["pretraining"] == [pretrain_run]
    assert float(rows["VTAB-1k mean"][0]) == pytest.approx(report["summary"]["mean"])


def _recorded_trials(record: Path) -> dict[str, dict]:
    """Trial name -> its record (top1, trial id, finish time) in the driver's record of
    finished trials: what a rerun keeps. (Tune's result.json can lag it: a driver killed
    between our callback and Tune's logger leaves a recorded trial without a final line.)"""
    if not record.exists():
        return {}
    try:
        doc = json.loads(record.read_text())
    except ValueError:          # caught mid-write (it is replaced atomically, but be safe)
        return {}
    return {f"{t['task']}-lr{t['lr']:g}-seed{t['seed']}": t for t in doc["trials"]}


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_resumes_without_redoing_finished_trials(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=2,
                                        num_heads=2, mlp_dim=64, num_classes=10)),
                          tmp_path / "ckpt")
    data = make_tasks(tmp_path / "vtab-1k", ("eurosat", "kitti"))
    args = ["--checkpoint", str(checkpoint), "--data", str(data), "--tasks", "eurosat,kitti",
            "--resolution", "32", "--lrs", "0.01", "--steps", "250", "--batch-size", "32",
            "--seeds", "3", "--max-concurrent-trials", "1", "--out", str(tmp_path / "ev"),
            "--name", "killed"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}
    record = tmp_path / "ev" / "killed" / "final_trials.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval" / "vtab.py"), *args], env=env,
                            stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(_recorded_trials(record)) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)    # the driver and the Ray it started
    finally:
        stop_process_group(proc)
    before = _recorded_trials(record)
    assert 2 <= len(before) < 6, before

    out = run_vtab(args, {"MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "resuming" in out.stderr
    after = _recorded_trials(record)
    assert len(after) == 6
    for trial, result in before.items():    # the same trial id and finish time: not rerun
        assert after[trial] == result, f"{trial} ran again"
    rerun = {t["trial_id"] for name, t in after.items() if name not in before}
    assert len(rerun) == 6 - len(before) and not rerun & {t["trial_id"] for t in before.values()}
    report = json.loads((tmp_path / "ev" / "killed" / "vtab.json").read_text())
    assert sorted(len(row["seeds"]) for row in report["tasks"]) == [3, 3]
    assert "Mean of tasks" in out.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any trial, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    torch.manual_seed(0)
    checkpoint = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=1,
                                        num_heads=2, mlp_dim=64, num_classes=10)),
                          tmp_path / "ckpt")
    data = make_tasks(tmp_path / "vtab-1k", ("dtd", "kitti"), train=6, val=2, test=4,
                      image_size=16)
    return tmp_path, checkpoint, data


@pytest.mark.parametrize("case, message", [
    ("unknown task", r"unknown VTAB task\(s\) \['cifar10'\]; use all, natural, specialized"),
    ("missing data", r"svhn: .*/svhn/train800.txt is missing; expected the VTAB-1k layout"),
    ("no data folder", r"--data .*/nowhere: no such folder; give the VTAB-1k root"),
    ("lists disagree", r"dtd/test.txt:3: images/test/000002.jpg does not exist; the list "
                       r"file and the images disagree"),
    ("bad label", r"kitti/val200.txt:1: label 4 outside \[0, 4\)"),
    ("missing checkpoint", r"checkpoint not found: .*/nowhere"),
    ("not a ViT", r"is not a ViT checkpoint"),
    ("bad resolution", r"--resolution 6 is smaller than the checkpoint's patch size 8; "
                       r"use at least 8"),
    ("temp folder too long", r"TMPDIR=.* is \d+ bytes, too long for the socket paths of a "
                             r"local Ray .*export TMPDIR=/tmp"),
])
def test_bad_input_fails_before_any_trial(small_setup, capsys, monkeypatch, case, message):
    tmp_path, checkpoint, data = small_setup
    if case == "temp folder too long":
        long = tmp_path / ("t" * 60)
        long.mkdir()
        monkeypatch.setenv("TMPDIR", str(long))
        monkeypatch.delenv("RAY_TMPDIR", raising=False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = {"--checkpoint": str(checkpoint), "--data": str(data), "--tasks": "dtd,kitti",
            "--resolution": "32", "--out": str(tmp_path / "ev"), "--name": "bad"}
    if case == "unknown task":
        args["--tasks"] = "dtd,cifar10"
    elif case == "missing data":
        args["--tasks"] = "dtd,svhn"
    elif case == "no data folder":
        args["--data"] = str(tmp_path / "nowhere")
    elif case == "lists disagree":
        (data / "dtd" / "images" / "test" / "000002.jpg").unlink()
    elif case == "bad label":
        (data / "kitti" / "val200.txt").write_text("images/val200/000000.jpg 4\n")
    elif case == "missing checkpoint":
        args["--checkpoint"] = str(tmp_path / "nowhere")
    elif case == "not a ViT":
        from safetensors.torch import save_file

        save_file({"conv.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "resnet.safetensors"))
        args["--checkpoint"] = str(tmp_path / "resnet.safetensors")
    elif case == "bad resolution":
        args["--resolution"] = "6"
    code = main([x for kv in args.items() for x in kv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "ev").exists()              # no trial, no half-written output
    assert not (tmp_path / "mlflow.db").exists()       # no MLflow run either


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.s3
def test_checkpoint_data_and_results_on_s3(s3, tmp_path, monkeypatch):
    """Checkpoint, VTAB shards and the Tune experiments + report all on an S3 endpoint; the
    same command again reads the record of finished trials from S3 instead of rerunning them.
    With --no-mlflow, nothing goes to MLflow."""
    from jobs.make_shards import main as make_shards
    from pipeline import storage

    torch.manual_seed(0)
    checkpoint = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=1,
                                        num_heads=2, mlp_dim=64, num_classes=10)),
                          f"s3://{s3}/ckpt")
    local = make_tasks(tmp_path / "vtab-1k", ("kitti",), train=8, val=4, test=8)
    assert make_shards(["vtab", "--data", str(local / "kitti"), "--out", f"s3://{s3}/vtab/kitti",
                        "--num-classes", "4"]) == 0
    args = ["--checkpoint", checkpoint, "--data", f"s3://{s3}/vtab", "--tasks", "kitti",
            "--resolution", "32", "--lrs", "0.01", "--steps", "5", "--batch-size", "8",
            "--out", f"s3://{s3}/evals", "--name", "on-s3", "--no-mlflow"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    first = run_vtab(args, env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    # --no-mlflow: the report files only, no MLflow store touched
    assert "MLflow run:" not in first.stdout and not (tmp_path / "mlflow.db").exists()
    report = json.loads(storage.read_bytes(f"s3://{s3}/evals/on-s3/vtab.json"))
    assert report["tasks"][0]["task"] == "kitti" and report["data"] == f"s3://{s3}/vtab"
    assert any(k.startswith("final/kitti-lr0.01-seed0/")
               for k in storage.list_objects(f"s3://{s3}/evals/on-s3"))
    again = run_vtab(args, env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resuming" in again.stderr
    assert json.loads(storage.read_bytes(f"s3://{s3}/evals/on-s3/vtab.json"))["trials"] == \
        report["trials"]


@pytest.mark.ray
def test_trials_read_the_object_store_not_storage(ray_local, tmp_path):
    """Data is decoded once per phase into the object store: the trials still run after the
    task folder is gone."""
    import shutil

    from eval.config import VtabConfig
    from eval.sweep import run_phase
    from eval.trial import load_phase_data, load_pretrained
    from pipeline.config import apply_overrides

    torch.manual_seed(0)
    checkpoint = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=1,
                                        num_heads=2, mlp_dim=64, num_classes=10)),
                          tmp_path / "ckpt")
    data = make_tasks(tmp_path / "vtab-1k", ("kitti",), train=8, val=4, test=8)
    cfg = apply_overrides(VtabConfig(), [
        f"run.checkpoint={checkpoint}", f"data.uri={data}", "sweep.tasks=kitti",
        "finetune.resolution=32", "sweep.lrs=0.01,0.1", "finetune.steps=4",
        "finetune.batch_size=4", "sweep.gpus_per_trial=0", f"run.storage={tmp_path / 'ev'}",
        "run.name=object-store"])
    refs = load_phase_data(cfg, "select")
    shutil.rmtree(data)
    records = run_phase(cfg, "select", [{"task": "kitti", "lr": lr, "seed": 0,
                                         "phase": "select"} for lr in cfg.sweep.lrs],
                        refs, load_pretrained(cfg))
    assert sorted(r["lr"] for r in records) == [0.01, 0.1]
    assert all(r["error"] is None and 0 <= r["top1"] <= 100 for r in records), records


def test_reference_defaults_to_the_papers_protocol():
    from eval.vtab import config_from, parse_args

    base = ["--checkpoint", "c", "--data", "d", "--tasks", "dtd"]
    paper = config_from(parse_args([*base, "--reference", "vit-l16-i21k"]))
    assert (paper.sweep.protocol, paper.sweep.lrs, paper.finetune.steps, paper.sweep.seeds) == (
        "paper", (0.01,), 2500, 3)
    sweep = config_from(parse_args(base)).sweep
    assert (sweep.protocol, sweep.lrs, sweep.seeds) == ("vit", (0.001, 0.003, 0.01, 0.03), 1)
    mixed = config_from(parse_args([*base, "--reference", "vit-l16-i21k", "--seeds", "1"]))
    assert mixed.sweep.protocol == "vit", "a command that sets the sweep keeps it, named as such"
    for sets in (["--set", "sweep.seeds=1"], ["--set", "seeds=1"]):   # the old spelling too
        assert config_from(parse_args([*base, "--reference", "vit-l16-i21k", *sets])
                           ).sweep.protocol == "vit"
    with pytest.raises(ValueError, match="--protocol paper fixes lr 0.01, 2500 steps and 3"):
        config_from(parse_args([*base, "--protocol", "paper", "--lrs", "0.1"]))
    assert config_from(parse_args([*base, "--dropout", "0.2"])).finetune.dropout == 0.2


def test_evaluation_config_presets_set_and_show_config(tmp_path):
    """One typed mechanism, pretraining's: a preset, --set on any key (typed and checked),
    the flags as shorthands, --show-config printing what would run."""
    import json
    import subprocess
    import sys

    from eval.config import PRESETS, VtabConfig, demo
    from eval.vtab import config_from, parse_args
    from pipeline.config import apply_overrides

    cfg = demo()
    assert (cfg.finetune.resolution, cfg.sweep.lrs, cfg.finetune.steps,
            cfg.finetune.batch_size) == (32, (0.003, 0.03), 40, 32)
    assert len(cfg.sweep.tasks) == 19
    assert set(PRESETS) == {"vit", "per-task", "paper", "demo", "linear"}
    tuned = apply_overrides(VtabConfig(), [
        "finetune.steps=500", "sweep.lrs=0.01,0.03", "sweep.tasks=structured",
        "finetune.dropout=none", "run.name=x"])
    assert (tuned.finetune.steps, tuned.sweep.lrs, tuned.finetune.dropout, tuned.run.name) == (
        500, (0.01, 0.03), None, "x")
    assert len(tuned.sweep.tasks) == 8
    assert apply_overrides(VtabConfig(), ["sweep.tasks=kitti,natural"]).sweep.tasks[-1] == \
        "kitti"                                   # groups and names mix, in table order
    for bad, message in ((["finetune.steps=many"], "--set finetune.steps=many: expected int"),
                         (["finetune.lr=0.1"], r"--set finetune.lr: unknown key; finetune "
                                               r"has \['batch_size'"),
                         (["lr=0.1"], "--set lr: unknown section 'lr'"),
                         (["sweep.tasks=imagenet"], "unknown VTAB task"),
                         (["sweep.protocol=best"], r"must be one of \['paper', 'vit'"),
                         (["finetune.warmup_steps=40"], r"--warmup-steps \(finetune.warmup_"
                                                        r"steps\) must be in \[0, 40\)")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(demo(), bad)
    # The flags are --set shorthands, applied after it; --preset wins over the default.
    base = ["--checkpoint", "c", "--data", "d"]
    cfg = config_from(parse_args([*base, "--preset", "demo", "--set", "finetune.steps=80",
                                  "--steps", "60", "--tasks", "dtd"]))
    assert (cfg.finetune.steps, cfg.sweep.tasks, cfg.finetune.resolution) == (60, ("dtd",), 32)
    assert cfg.run.checkpoint == str(Path("c").resolve())       # local paths made absolute
    out = subprocess.run([sys.executable, "-m", "eval.vtab", *base, "--preset", "paper",
                          "--show-config"], capture_output=True, text=True, timeout=120)
    shown = json.loads(out.stdout)
    assert shown == json.loads(config_from(parse_args([*base, "--preset", "paper"])).to_json())
    assert shown["sweep"]["protocol"] == "paper" and shown["data"] == {"uri": "d"}
    # A flag's value is checked as its key's type, by argparse: one line, exit 2.
    bad = subprocess.run([sys.executable, "-m", "eval.vtab", *base, "--steps", "many"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "argument --steps: expected int, got 'many' (finetune.steps)" in bad.stderr


def test_finetune_dropout_is_vit_jax_s_per_checkpoint_value():
    """vit_jax fine-tunes the ViT paper's checkpoints with configs/vit.py, which keeps
    configs/models.py's `dropout_rate`, and AugReg checkpoints with configs/augreg.py:
        config.model = models.AUGREG_CONFIGS[model].copy_and_resolve_references()
        config.model.transformer.dropout_rate = 0  # No AugReg during fine-tuning."""
    from eval.finetune import finetune_dropout, is_augreg
    from pipeline.model import ViTConfig

    sizes = ("Ti/16", "S/16", "B/16", "B/32", "L/16", "L/32", "H/14", "R50+B/16", "R50+L/32",
             "R26+S/32", "R26+B/32")
    paper = {v: finetune_dropout(ViTConfig.from_variant(v)) for v in sizes}
    # models.py: dropout_rate 0.1 in get_l16_config and get_h14_config (get_l32_config sets
    # it back to 0); get_r50_b16_config sets 0.1. R50+L/32 (get_r50_l32_config, from L/16's
    # 0.1) is released only as an AugReg checkpoint (R50_L_32-i21k-300ep-...), so augreg.py
    # fine-tunes it at 0; the R26 hybrids start from S/16 and B/32 (0).
    assert paper == {"Ti/16": 0.0, "S/16": 0.0, "B/16": 0.0, "B/32": 0.0, "L/16": 0.1,
                     "L/32": 0.0, "H/14": 0.1, "R50+B/16": 0.1, "R50+L/32": 0.0,
                     "R26+S/32": 0.0, "R26+B/32": 0.0}
    assert all(finetune_dropout(ViTConfig.from_variant(v), augreg=True) == 0.0 for v in sizes)
    # Which checkpoints are AugReg's: by the names vit_jax, timm and our presets give them.
    augreg = ["gs://vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-"
              "sd_0.0.npz", "/ckpt/R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-"
              "sd_0.1.npz", "hf://timm/vit_large_patch16_224.augreg_in21k",
              "hf://timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit-l16-i21k-augreg"]
    paper_names = ["gs://vit_models/imagenet21k/ViT-L_16.npz", "/ckpt/R50+ViT-B_16.npz",
                   "hf://google/vit-large-patch16-224-in21k", "s3://b/vit-l16-i21k/step_10",
                   "hf://timm/vit_large_patch32_224.orig_in21k"]
    assert [is_augreg(n) for n in augreg] == [True] * len(augreg)
    assert [is_augreg(n) for n in paper_names] == [False] * len(paper_names)
    assert is_augreg("s3://b/ckpt/step_00001000", "vit-l16-i21k-augreg")    # our run's name

def test_load_pretrained_gives_an_augreg_checkpoint_no_dropout(tmp_path, monkeypatch):
    """The sweep's weights carry the fine-tuning dropout `finetune_dropout` picks from the
    checkpoint's name or run name: 0 for AugReg's, the size's value otherwise, `--dropout`
    over both. A Ti/16 stands in for an L/16 (the table patched to give it L/16's 0.1), to
    keep the files small."""
    from eval import finetune
    from eval.config import VtabConfig
    from eval.trial import load_pretrained

    monkeypatch.setitem(finetune.PAPER_FINETUNE_DROPOUT, "Ti/16", 0.1)
    model = ViT(ViTConfig.from_variant("Ti/16", image_size=32, num_classes=10, dropout=0.3))
    paper = save_vit(model, tmp_path / "ViT-Ti_16")
    augreg = save_vit(model, tmp_path / "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0")
    ours = save_vit(model, tmp_path / "step_00000100", metadata={
        "step": 100, "run_name": "vit-ti16-i21k-augreg"})
    got = {name: load_pretrained(VtabConfig().updated({"run.checkpoint": str(path)})).config[
        "dropout"] for name, path in (("paper", paper), ("augreg", augreg), ("ours", ours))}
    assert got == {"paper": 0.1, "augreg": 0.0, "ours": 0.0}
    forced = VtabConfig().updated({"run.checkpoint": str(augreg), "finetune.dropout": 0.2})
    assert load_pretrained(forced).config["dropout"] == 0.2
