"""Ctrl-C and SIGTERM (what `ray job stop` and Kubernetes send), as real signals to the real
command at the moments they come: while it starts up, while it trains, twice in a row. Each
time: one line, exit 130 / 143, no traceback, the MLflow run KILLED, no staging folder, no
Ray process of the command left behind, the newest checkpoint complete; the same command
then continues, logging no step twice."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def commands():
    """Start a Command (killed and cleaned up after the test, whatever happened)."""
    started: list[Command] = []

    def start(*args, **kwargs) -> Command:
        started.append(Command(*args, **kwargs))
        return started[-1]

    yield start
    for cmd in started:
        if cmd.proc.poll() is None:
            os.killpg(cmd.proc.pid, signal.SIGKILL)
        cmd.close()


class Command:
    """`vit-pretrain` in its own session, marked so that every process it starts (Ray's
    GCS, raylet, workers inherit the environment) can be found afterwards."""

    def __init__(self, tmp_path: Path, tracking_uri: str, *args: str,
                 module: str = "jobs.pretrain"):
        self.mark = uuid.uuid4().hex
        # Short: Ray's socket paths under TMPDIR must stay within 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="it", dir="/tmp"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TMPDIR": str(self.tmp),
               "VIT_TEST_MARK": self.mark, "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": str(ROOT)}
        env.pop("RAY_ADDRESS", None)
        self.log = tmp_path / f"out-{self.mark[:6]}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def signal(self, sig: int) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def leftovers(self, grace_s: float = 10.0) -> list[str]:
        """Processes of this command still alive after `grace_s`."""
        import psutil

        deadline = time.monotonic() + grace_s
        while True:
            alive = []
            for p in psutil.process_iter(["pid", "name"]):
                try:
                    if p.environ().get("VIT_TEST_MARK") == self.mark:
                        alive.append(f"{p.pid} {p.info['name']}")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


def wait_for(predicate, timeout: float, what: str, cmd: Command) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if cmd.proc.poll() is not None:
            pytest.fail(f"the command ended (rc {cmd.proc.returncode}) before {what}:\n"
                        f"{cmd.output()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s:\n{cmd.output()[-3000:]}")
        time.sleep(0.3)


def last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def own_traceback(text: str) -> bool:
    """A traceback printed by the command itself (Ray's actors print theirs prefixed with
    "(ActorName pid=N)": Ray's noise, not the command's)."""
    return re.search(r"^Traceback \(most recent call last\)", text, re.M) is not None


def runs_of(tracking_uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps, f"tags.`vit.run_name` = '{name}'")


def core_worker_started(cmd: Command) -> bool:
    """The driver's core worker has started: `ray.init` is past starting Ray's processes and
    connecting, not yet returned (the moment Ray's C++ failure-signal handler, were it
    installed in the driver, would take a SIGTERM for a crash)."""
    return any(cmd.tmp.glob("ray/session_*/logs/python-core-driver-*.log"))


# SIGINT while the modules load; SIGTERM inside `ray.init`, as soon as the driver's core
# worker exists.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up(tmp_path, mlflow_server, sig, commands):
    cmd = commands(tmp_path, mlflow_server.uri, "--preset", "smoke", "--out",
                   str(tmp_path / "runs"), "--name", f"startup-{sig}")
    if sig == signal.SIGINT:
        time.sleep(1.0)
    else:
        deadline = time.monotonic() + 120
        while not core_worker_started(cmd):   # polled fast: the moment lasts ~0.3 s
            assert cmd.proc.poll() is None and time.monotonic() < deadline, cmd.output()
            time.sleep(0.01)
    sent = cmd.signal(sig)
    rc = cmd.wait(60)
    took = time.monotonic() - sent
    out = cmd.output()
    assert rc == 128 + sig, out[-2000:]
    assert took < 30
    assert last_line(out).startswith(f"interrupted by {signal.Signals(sig).name}")
    assert not own_traceback(out) and "KeyboardInterrupt" not in out
    assert "received at time=" not in out, "Ray's native crash handler took the signal"
    assert cmd.leftovers() == []
    assert not (tmp_path / "runs" / f"startup-{sig}" / "lease.json").exists()


def test_sigterm_while_training_then_the_same_command_continues(tmp_path, mlflow_server,
                                                               commands):
    storage, name = tmp_path / "runs", "interrupted"
    args = ["--preset", "smoke", "--out", str(storage), "--name", name,
            "--set", "checkpoint.every=10",
            "--set", "train.log_every=5", "--set", "probe.every=0"]
    cmd = commands(tmp_path, mlflow_server.uri, *args, "--set", "train.total_steps=5000")
    run = storage / name
    wait_for(lambda: (run / "step_00000020" / "train_state.json").exists(), 240,
             "second checkpoint", cmd)
    sent = cmd.signal(signal.SIGTERM)
    rc = cmd.wait(60)
    took = time.monotonic() - sent
    out = cmd.output()
    assert rc == 143, out[-3000:]
    assert took < 30, f"took {took:.0f} s to stop"
    line = last_line(out)
    assert line.startswith(f"interrupted by SIGTERM: run '{name}' stopped; newest checkpoint "
                           f"{run}/step_"), line
    assert not own_traceback(out)
    newest = line.split("newest checkpoint ")[1].split(";")[0]
    from pipeline.train import checkpoints

    assert checkpoints.latest(str(run)) == newest
    assert checkpoints.verify(newest) is None
    client, runs = runs_of(mlflow_server.uri, name)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not (run / "lease.json").exists()
    assert list(cmd.tmp.glob("vit-ckpt-*")) == [], "staging folders left behind"
    assert cmd.leftovers() == []

    # How far the killed run logged: past its newest checkpoint, most likely.
    stopped_at = json.loads((Path(newest) / "train_state.json").read_text())["step"]
    total = stopped_at + 20
    # And the newest checkpoint is damaged meanwhile (same size, one byte): the run falls
    # back to the one before, with a warning, instead of failing or retrying.
    shard = Path(newest) / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = commands(tmp_path, mlflow_server.uri, *args, "--set", f"train.total_steps={total}")
    assert again.wait(300) == 0, again.output()[-3000:]
    assert f"checkpoint {newest} is damaged (state/__0_0.distcp does not match its recorded " \
           f"SHA-256): falling back to the previous one" in again.output()
    assert f"start at step {stopped_at - 10} " in again.output()
    client, runs = runs_of(mlflow_server.uri, name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(steps)}"
    assert steps == sorted(steps)      # (the killed run may have logged past `total`)
    assert set(range(5, total + 1, 5)) <= set(steps)


def test_a_second_ctrl_c_exits_at_once(tmp_path, mlflow_server, commands):
    storage, name = tmp_path / "runs", "twice"
    cmd = commands(tmp_path, mlflow_server.uri, "--preset", "smoke", "--out", str(storage),
                   "--name", name, "--set", "train.total_steps=5000",
                   "--set", "checkpoint.every=10")
    wait_for(lambda: (storage / name / "step_00000010" / "train_state.json").exists(), 240,
             "first checkpoint", cmd)
    cmd.signal(signal.SIGINT)
    # Two signals before the main thread runs its handler count as one (CPython keeps one
    # pending flag a signal): wait until the first was handled, as a person would see it.
    wait_for(lambda: "SIGINT: stopping cleanly (send it again" in cmd.output(), 30,
             "the first signal handled", cmd)
    again = cmd.signal(signal.SIGINT)
    rc = cmd.wait(30)
    assert rc == 130
    assert time.monotonic() - again < 5      # no waiting for the graceful stop
    assert "SIGINT again: exiting now" in cmd.output()
    assert cmd.leftovers() == []


def test_sigterm_during_a_vtab_trial(tmp_path, mlflow_server, commands):
    import torch

    from eval.data import write_grating_task
    from eval.tasks import BY_NAME
    from pipeline.model import ViT, ViTConfig
    from pipeline.weights import save_vit

    torch.manual_seed(0)
    checkpoint = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=2,
                                        num_heads=2, mlp_dim=64, num_classes=10)),
                          tmp_path / "ckpt")
    write_grating_task(tmp_path / "vtab-1k", BY_NAME["eurosat"], seed=0)
    storage = tmp_path / "ev"
    cmd = commands(tmp_path, mlflow_server.uri, "--checkpoint", str(checkpoint), "--data",
                   str(tmp_path / "vtab-1k"), "--tasks", "eurosat", "--resolution", "32",
                   "--lrs", "0.01", "--steps", "800", "--batch-size", "32", "--seeds", "4",
                   "--max-concurrent-trials", "1", "--out", str(storage), "--name", "term",
                   module="eval.vtab")
    record = storage / "term" / "final_trials.json"
    wait_for(record.exists, 300, "a finished trial", cmd)
    sent = cmd.signal(signal.SIGTERM)
    rc = cmd.wait(60)
    out = cmd.output()
    assert rc == 143, out[-3000:]
    assert time.monotonic() - sent < 30
    line = last_line(out)
    assert line.startswith("interrupted by SIGTERM: evaluation stopped; "), line
    assert "trial(s) finished are kept" in line and "the same command resumes" in line
    assert not own_traceback(out)
    assert 1 <= len(json.loads(record.read_text())["trials"]) < 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("vtab")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params.get("checkpoint", str(checkpoint)) == str(checkpoint)
    assert parent.info.status == "KILLED"
    assert cmd.leftovers() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_writing_shards(tmp_path, sig):
    """Ctrl-C reaches the whole process group (the decoding processes too); SIGTERM only the
    command. Either way: shards written stay, no partial file, no manifest, the same command
    completes keeping them."""
    dst = tmp_path / "shards"
    args = [sys.executable, "-m", "jobs.make_shards", "synthetic", "--out", str(dst),
            "--num-samples", "2500", "--image-size", "64", "--shard-size-mb", "0.1",
            "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "shards.log"
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(dst.glob("*.tar"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)          # what a terminal's Ctrl-C does
        else:
            proc.send_signal(sig)
        sent = time.monotonic()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 128 + sig, out[-2000:]
    assert time.monotonic() - sent < 30
    assert last_line(out).startswith(f"interrupted by {signal.Signals(sig).name}: shard "
                                     f"writing stopped; the shards written so far stay")
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    written = sorted(p.name for p in dst.glob("*.tar"))
    assert written and not (dst / "manifest.json").exists()
    assert [p.name for p in dst.iterdir() if p.name.endswith(".partial")] == []

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (dst / "manifest.json").exists()
    kept = int(re.search(r"kept (\d+) identical shard", again.stdout + again.stderr).group(1))
    assert kept >= len(written) - 1          # the last one may have been cut mid-write


@pytest.mark.s3
def test_sigterm_mid_upload_leaves_the_newest_checkpoint_complete_or_ignored(
        tmp_path, mlflow_server, s3, s3_server, commands, monkeypatch):
    """Checkpoints on an S3 endpoint slowed to 0.3 s a request: SIGTERM while a checkpoint's
    objects are being uploaded (some there, its train_state.json not yet)."""
    import boto3

    from infra.s3_proxy import SlowS3Proxy
    from pipeline.train import checkpoints

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")

    def keys(prefix):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3, Prefix=prefix)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    run = f"s3://{s3}/runs/upload"
    with SlowS3Proxy(s3_server, latency_s=0.3, mbps=50) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)    # the command's endpoint
        cmd = commands(tmp_path, mlflow_server.uri, "--preset", "smoke", "--out",
                       f"s3://{s3}/runs", "--name", "upload", "--set", "train.total_steps=5000",
                       "--set", "checkpoint.every=10", "--set", "probe.every=0")

        def mid_upload():
            found = keys("runs/upload/step_")
            steps = {k.split("/")[2] for k in found}
            return any(f"runs/upload/{s}/train_state.json" not in found for s in steps)

        wait_for(mid_upload, 300, "a checkpoint upload in progress", cmd)
        sent = cmd.signal(signal.SIGTERM)
        rc = cmd.wait(60)
    out = cmd.output()
    assert rc == 143, out[-3000:]
    assert time.monotonic() - sent < 30
    assert last_line(out).startswith("interrupted by SIGTERM: run 'upload' stopped; ")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    # Whatever the upload left: the run's newest checkpoint is a complete, intact one (or
    # there is none), never the half-uploaded one.
    newest = checkpoints.latest(run)
    half = {k.split("/")[2] for k in keys("runs/upload/step_")} - {
        k.split("/")[2] for k in keys("runs/upload/step_") if k.endswith("train_state.json")}
    if newest is not None:
        assert newest.rsplit("/", 1)[-1] not in half
        assert checkpoints.verify(newest) is None
    assert cmd.leftovers() == []


def test_ctrl_c_during_the_handoff_evaluation_then_the_same_command_resumes(
        tmp_path, mlflow_server, commands):
    """vit-pretrain with eval.at_end on one machine: SIGINT while the final checkpoint's VTAB
    evaluation runs (one task's trial finished, the other's still running). Training's run
    stays FINISHED and its checkpoint complete; the evaluation's runs are KILLED; one line,
    exit 130, no process left. The same command then trains nothing and resumes the
    evaluation, keeping the finished trial."""
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    vtab, storage, name = tmp_path / "vtab", tmp_path / "runs", "handed"
    # eurosat: 40 images, done in a second; dtd: 400 test images at 224 px, seconds more.
    write_grating_task(vtab, BY_NAME["eurosat"], train=20, val=10, test=10, image_size=32)
    write_grating_task(vtab, BY_NAME["dtd"], train=20, val=10, test=400, image_size=32)
    args = ["--preset", "smoke", "--out", str(storage), "--name", name,
            "--set", "train.total_steps=10", "--set", "optim.warmup_steps=2",
            "--set", "probe.every=0", "--set", "eval.at_end=true", "--set", f"eval.data={vtab}",
            "--set", "eval.tasks=eurosat,dtd", "--set", "eval.resolution=224",
            "--set", "eval.test_images=0"]
    cmd = commands(tmp_path, mlflow_server.uri, *args)

    def trials_finished() -> int:
        records = list((storage / "vtab").glob("*/final_trials.json"))
        return len(json.loads(records[0].read_text())["trials"]) if records else 0

    wait_for(lambda: trials_finished() >= 1, 300, "a finished VTAB trial", cmd)
    sent = cmd.signal(signal.SIGINT)
    rc = cmd.wait(60)
    out = cmd.output()
    assert rc == 130, out[-3000:]
    assert time.monotonic() - sent < 30
    line = last_line(out)
    assert line.startswith("interrupted by SIGINT: evaluation stopped; 1 final trial(s) "
                           "finished are kept"), line
    assert not own_traceback(out) and "KeyboardInterrupt" not in out
    assert f"Pretraining run '{name}' finished at step 10" in out
    from pipeline.train import checkpoints

    assert checkpoints.verify(str(storage / name / "step_00000010")) is None
    client, runs = runs_of(mlflow_server.uri, name)
    assert [r.info.status for r in runs] == ["FINISHED"]

    def vtab_runs():
        exp = client.get_experiment_by_name("vtab")
        return client.search_runs([exp.experiment_id],
                                  f"tags.checkpoint = '{storage / name / 'step_00000010'}'")

    assert [r.info.status for r in vtab_runs()] == ["KILLED"]
    assert cmd.leftovers() == []

    again = commands(tmp_path, mlflow_server.uri, *args)
    assert again.wait(300) == 0, again.output()[-3000:]
    out = again.output()
    assert "final: resuming from " in out and "(1 of 2 trials finished are kept)" in out, \
        out[-3000:]
    assert "VTAB-1k (linear) of " in out and "warning:" not in out
    assert {r.info.status for r in vtab_runs()} == {"FINISHED"}
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "vtab/mean")]
    assert steps == [10]
    # The handoff's report: the `linear` protocol on both tasks, of the final checkpoint.
    (report,) = (storage / "vtab").glob("*/vtab.json")
    doc = json.loads(report.read_text())
    assert doc["settings"]["protocol"] == "linear"
    assert doc["checkpoint"].endswith(f"{name}/step_00000010")
    assert [t["task"] for t in doc["tasks"]] == ["dtd", "eurosat"]
    assert all(len(t["seeds"]) == 1 for t in doc["tasks"])
