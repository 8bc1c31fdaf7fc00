"""`ray job submit -- python jobs/pretrain.py` against a `ray start --head` that the test
starts (and stops, with all its processes), logging to a real MLflow server, handing its
checkpoints to VTAB-1k on the cluster while it trains. Runs over several nodes:
tests/jobs/test_node_loss.py (real `ray start` nodes, a worker on each)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]


ANSI = re.compile(r"\x1b\[[0-9;]*m")
OURS = re.compile(r"^(\(RayTrainWorker pid=\d+\) (start at step|step \d+/\d+ )|"
                  r"resolved config|  |\S+ \S+ (INFO|WARNING) (pipeline|eval)\.|"
                  r"Pretraining run '|VTAB-1k \(linear\) of |$)")
EVALUATION = re.compile(r"^\(_remote_evaluate pid=\d+\) ")
# Lines Ray prints once a job: the job manager's two, the token-authentication notice, and
# a C++ error-level note from Ray Train's controller about its preemption watcher.
RAY_BANNERS = ("Runtime env is setting up", "Running entrypoint for job",
               "Token authentication is enabled", "'PreemptionWatcher'")


def lines_by_source(text: str) -> dict[str, list[str]]:
    """The lines of a `ray job submit` output between Ray's own "Tailing logs" and the
    job's end, by source: ours, Ray's banners, and anything else."""
    lines = ANSI.sub("", text).splitlines()
    start = next(i for i, ln in enumerate(lines) if "Tailing logs until" in ln)
    end = next(i for i, ln in enumerate(lines) if i > start and "SUCC cli.py" in ln)
    sources = {"ours": [], "ray banner": [], "other": []}
    for line in lines[start + 1:end]:
        own = EVALUATION.sub("", line)     # the handoff's Ray task says what vit-vtab would
        kind = ("ray banner" if any(b in line for b in RAY_BANNERS) else
                "ours" if OURS.match(own) else "other")
        sources[kind].append(line)
    return sources


def test_ray_job_submit_pretrain(ray_head, mlflow_server, tmp_path):
    """Also the handoff on a cluster (eval.vtab_every=1, the `linear` protocol on one tiny
    task): the step-30 checkpoint goes at once to a Ray task that holds no CPU; its trial
    queues for the CPUs training holds (2 workers, and read tasks on the rest of the head's
    4), so training goes on to step 60 without waiting for it, then the final one is
    evaluated; both results land in the pretraining run at their steps."""
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    address, env = ray_head
    write_grating_task(tmp_path / "vtab", BY_NAME["eurosat"], train=20, val=10, test=10,
                       image_size=32)
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.uri,
                                           "RAY_AUTH_MODE": "token"}})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", runtime_env, "--", sys.executable, "jobs/pretrain.py",
           "--preset", "smoke", "--name", "submitted", "--out", str(tmp_path / "runs"),
           "--workers", "2", "--set", "train.total_steps=60", "--set", "checkpoint.every=30",
           "--set", "eval.vtab_every=1", "--set", "eval.at_end=true",
           "--set", f"eval.data={tmp_path / 'vtab'}", "--set", "eval.tasks=eurosat",
           "--set", "eval.resolution=32", "--set", "eval.test_images=10"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Pretraining run 'submitted' finished at step 60" in log
    final = tmp_path / "runs" / "submitted" / "step_00000060"
    assert f"checkpoint: {final}" in log
    # A job log is no terminal: no progress bars, from the driver or from the Train
    # controller, where the dataset is built and its bars would start.
    assert "row/s]" not in log and "Tasks: " not in log, log[-3000:]
    # The job's log, line by line: ours (the config, progress, summary), Ray's banners once
    # at most, and nothing else at the default level.
    sources = lines_by_source(out.stdout)
    assert not sources["other"], "\n".join(sources["other"][:40])
    assert len(sources["ray banner"]) <= len(RAY_BANNERS), sources["ray banner"]
    assert sum("step " in ln for ln in sources["ours"]) >= 2, sources["ours"]

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("vit-smoke").experiment_id],
                              "tags.`vit.run_name` = 'submitted'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.total_steps"] == "60"
    assert run.data.params["scale.num_workers"] == "2"
    assert run.data.params["model.hidden_size"] == "64"
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec",
                "perf/data_wait_frac", "fewshot/synthetic/1shot"):
        assert key in run.data.metrics, key
    assert run.data.params["images_per_step"] == "64"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "checkpoint_uri.txt"} <= artifacts

    # The handoff: both checkpoints evaluated, each in its line and at its step in the
    # pretraining run; training did not wait for the step-30 evaluation.
    evaluated = [ln for ln in log.splitlines() if ln.startswith("VTAB-1k (linear) of ")]
    assert [ln.split(":")[0].rsplit("/", 1)[-1] for ln in evaluated] == [
        "step_00000030", "step_00000060"], log[-3000:]
    assert "warning:" not in log
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "vtab/mean"))
    assert steps == [30, 60], steps
    vtab = client.search_runs([client.get_experiment_by_name("vtab").experiment_id],
                              f"tags.checkpoint = '{final.parent / 'step_00000030'}'")
    assert len(vtab) == 1 and vtab[0].info.status == "FINISHED"
    assert run.info.end_time < vtab[0].info.end_time, "training waited for an evaluation"
