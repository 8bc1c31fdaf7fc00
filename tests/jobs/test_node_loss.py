"""Losing a node mid-run, on a cluster of real `ray start` processes: a head (no CPUs: it
holds the driver and Ray Train's controller, as a cluster's head does) and two worker nodes,
each its own process group with its own temp dir and resources. The test SIGKILLs one worker
node's raylet and every process of that node at once, as a lost machine.

- Pretraining (`vit-pretrain`, 2 workers spread over the two nodes): Ray Train restarts the
  worker group, which fits on the surviving node (the run's scale is fixed; a cluster without
  room waits until a replacement node joins), from the newest checkpoint; the run reaches its
  last step with the data position exact and no MLflow step logged twice.
- VTAB (`vit-vtab`): trials that finished are kept, the lost ones run again on the surviving
  node, and every task is reported.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline.tracking import start_steps
from pipeline.train import checkpoints
from tests.conftest import sqlite_store, stop_process_group
from tests.pipeline.train.test_restarts import (
    IN_FLIGHT,
    check_every_sample_once,
    check_recorded_position,
    command,
    history,
    make_data,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The GCS declares a node dead after `failure_threshold` failed health checks, one every
# `period` (defaults: 5, 3 s); here 3 a second, so that a loss is noticed in ~3 s. A killed
# raylet refuses the check at once; the timeout is for a live one slow to answer (loaded CI).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
                   "RAY_health_check_failure_threshold": "3"}

WAIT_NODES = """
import sys, time
from ray._raylet import GcsClient
gcs = GcsClient(address=sys.argv[1])
while sum(n.state == 0 for n in gcs.get_all_node_info(timeout=5).values()) != int(sys.argv[2]):
    time.sleep(0.3)
"""


def distinct_ports(n: int) -> list[int]:
    """n free ports, all different (free_port() twice may give the same one)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """`ray start --block` per node, each in its own session and marked in its environment
    (`VIT_TEST_NODE`, which every process of the node inherits), with token authentication
    under a token of its own (never ~/.ray/auth_token)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.free = distinct_ports(40)
        self.port = self.free.pop()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), **FAST_NODE_DEATH}
        # Ray's state API in Train's actors looks RAY_ADDRESS up, and finds several clusters
        # on this machine without it.
        self.env["RAY_ADDRESS"] = self.address
        self.nodes: dict[str, subprocess.Popen] = {}
        self.temp_dirs: list[str] = []

    def start(self, name: str, *args: str) -> None:
        tmp = tempfile.mkdtemp(prefix="nl", dir="/tmp")   # socket paths must stay < 108 bytes
        self.temp_dirs.append(tmp)
        ports = [f"--{p}-port={self.free.pop()}" for p in (
            "metrics-export", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
            "node-manager", "object-manager")]
        # 100 MB of object store a node (the default, 30% of the RAM, is per node).
        cmd = [str(BIN / "ray"), "start", "--block", f"--temp-dir={tmp}",
               "--object-store-memory=100000000", *ports, *args]
        self.nodes[name] = subprocess.Popen(
            cmd, env={**self.env, "VIT_TEST_NODE": name}, stdout=open(self.log_dir / f"{name}.log",
                                                                     "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)

    def start_all(self, workers: int, cpus: int) -> None:
        # With the dashboard, as a cluster's head: Ray Train's controller queries its state
        # API (and logs a failure every second without it).
        self.start("head", "--head", f"--port={self.port}", "--num-cpus=0",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.free.pop()}",
                   f"--ray-client-server-port={self.free.pop()}")
        for i in range(1, workers + 1):
            self.start(f"w{i}", f"--address={self.address}", f"--num-cpus={cpus}")
        self.wait_for_nodes(workers + 1)

    def wait_for_nodes(self, alive: int, timeout: float = 120) -> None:
        waiter = subprocess.Popen([sys.executable, "-c", WAIT_NODES, self.address, str(alive)],
                                  env=self.env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        try:
            while waiter.poll() is None:
                for name, node in self.nodes.items():
                    if node.poll() is not None:
                        log = (self.log_dir / f"{name}.log").read_text(errors="replace")
                        self.keep_logs()
                        pytest.fail(f"node {name} exited ({node.returncode}):\n{log[-2000:]}")
                if time.monotonic() > deadline:
                    self.keep_logs()
                    pytest.fail(f"{alive} nodes not up after {timeout} s")
                time.sleep(0.2)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        assert waiter.returncode == 0, waiter.stderr.read()[-2000:]

    def keep_logs(self) -> None:
        """Ray's own logs of every node into the test's folder (the temp dirs go at the end)."""
        for tmp in self.temp_dirs:
            logs = Path(tmp) / "session_latest" / "logs"
            shutil.copytree(logs, self.log_dir / "ray-logs" / Path(tmp).name,
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)

    def pids(self, name: str) -> dict[int, str]:
        """pid -> command line of every process of node `name`."""
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.environ().get("VIT_TEST_NODE") == name:
                    found[p.pid] = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def kill(self, name: str) -> dict[int, str]:
        """SIGKILL the node's process group and every process marked as the node's, at
        once: the raylet, its workers, its agents. -> what was killed."""
        victims = self.pids(name)
        try:
            os.killpg(self.nodes[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims

    def stop(self) -> None:
        """SIGKILL every node (a graceful `ray stop` takes ~10 s here, and nothing of a test
        cluster is worth keeping), then reap them."""
        for name, proc in self.nodes.items():
            self.kill(name)
            proc.wait()
        for tmp in self.temp_dirs:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def wait_until(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str,
               every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(every)


def test_pretraining_continues_on_the_surviving_node(cluster, tmp_path):
    cluster.start_all(workers=2, cpus=2)
    manifest = make_data(tmp_path / "data")            # 5 steps an epoch
    run_dir = tmp_path / "runs" / "node-lost"
    tracking = sqlite_store(tmp_path / "mlflow.db")
    # Steps are cheap here (~0.1 s) and checkpoints land 1-3 s after their step: a margin
    # that keeps the kill well before the last step.
    total = 120
    # SPREAD: one worker on each node; after the loss both fit on the survivor (2 CPUs).
    cmd = command(tmp_path, tmp_path / "data", "node-lost", f"train.total_steps={total}",
                  "checkpoint.every=10", "scale.placement_strategy=SPREAD",
                  "run.shared_storage=true", "train.system_metrics_s=0")
    env = {**cluster.env, "MLFLOW_TRACKING_URI": tracking}
    # A node-local --out on a cluster of several nodes: refused before anything starts (each
    # node would keep checkpoints of its own).
    local = [a for a in cmd if a != "run.shared_storage=true"]
    local = [a for i, a in enumerate(local) if not (a == "--set" and local[i + 1] == "--set")]
    refused = subprocess.run(local, env=env, capture_output=True, text=True, timeout=300,
                             cwd=ROOT)
    assert refused.returncode == 2, (refused.stdout + refused.stderr)[-3000:]
    assert "is a local folder but the cluster has 3 nodes; use --out s3://bucket/prefix" in \
        refused.stderr, refused.stderr[-2000:]
    assert not run_dir.exists()
    log = tmp_path / "pretrain.log"
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT)
    try:
        # Checkpoints land a few seconds after their step (written in the background): the
        # first complete one, whichever step, is the moment.
        wait_until(lambda: checkpoints.latest(str(run_dir)), proc, log, 300,
                   "a complete checkpoint")
        killed_at = time.monotonic()
        survivor = cluster.pids("w2")
        victims = cluster.kill("w1")
        rc = proc.wait(timeout=400)
        ended = time.monotonic()
    finally:
        stop_process_group(proc)
    out = log.read_text(errors="replace")
    # One worker on each node before the loss (the stream of each executed on its own node).
    assert any("RayTrainWorker" in c for c in victims.values()), victims
    assert any("RayTrainWorker" in c for c in survivor.values()), survivor
    assert any("raylet" in c for c in victims.values()), victims
    assert rc == 0, out[-4000:]
    assert f"finished at step {total}" in out
    print(f"w1 killed {killed_at - started:.1f} s after the start, the run ended "
          f"{ended - killed_at:.1f} s after the kill")

    samples, restarts = history(tmp_path / "trace")
    assert restarts == 1
    check_every_sample_once(samples, manifest, total=total * 64, in_flight=IN_FLIGHT)
    final = checkpoints.latest(str(run_dir))
    assert final == str(run_dir / f"step_{total:08d}")
    check_recorded_position(final, samples, manifest)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("vit-smoke").experiment_id])
    starts = start_steps(run)
    # Restarted once, from a checkpoint taken before the kill, with steps left to train.
    assert len(starts) == 2 and starts[0] == 0 and 10 <= starts[1] < total, starts
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged a step twice: {sorted(steps)}"


def trial_results(experiment: Path) -> dict[str, list[dict]]:
    """Trial directory -> the results it reported so far (a line still being written
    left out)."""
    trials = {}
    for path in experiment.glob("*/result.json"):
        lines = path.read_text().splitlines()
        trials[path.parent.name] = [json.loads(ln) for ln in lines if ln.endswith("}")]
    return trials


def finished_trials(experiment: Path) -> dict[str, dict]:
    """Trial directory -> its final result (with `top1`), for the trials that finished."""
    return {name: [r for r in results if "top1" in r][-1]
            for name, results in trial_results(experiment).items()
            if any("top1" in r for r in results)}


def running_trial(experiment: Path, node: str) -> tuple[str, int] | None:
    """(trial, pid) of a trial that has reported progress but not finished, in a process of
    `node`."""
    for name, results in trial_results(experiment).items():
        if results and "top1" not in results[-1]:
            try:
                if psutil.Process(results[-1]["pid"]).environ().get("VIT_TEST_NODE") == node:
                    return name, results[-1]["pid"]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return None


def test_vtab_keeps_finished_trials_and_reschedules_the_lost_ones(cluster, tmp_path):
    import torch

    from pipeline.model import ViT, ViTConfig
    from pipeline.weights import save_vit
    from tests.eval.test_vtab import make_tasks

    cluster.start_all(workers=2, cpus=1)
    torch.manual_seed(0)
    checkpoint = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=2,
                                        num_heads=2, mlp_dim=64, num_classes=10)),
                          tmp_path / "ckpt")
    data = make_tasks(tmp_path / "vtab-1k", ("eurosat", "kitti"))
    # One rate (no selection phase); 2 tasks x 2 seeds = 4 trials of 1 CPU: one at a time on
    # each worker node, two rounds. A progress report every 2.5% of the steps shows a trial
    # running (and on which node) from early on; 3,000 steps keep a trial running long enough
    # (~20 s on 2 cores) to be caught on w1 after another has finished.
    cmd = [sys.executable, "-m", "eval.vtab", "--checkpoint", str(checkpoint), "--data",
           str(data), "--tasks", "eurosat,kitti", "--resolution", "32", "--lrs", "0.01",
           "--steps", "3000", "--batch-size", "32", "--seeds", "2", "--cpus-per-trial", "1",
           "--set", "sweep.progress_reports=40", "--out", str(tmp_path / "ev"), "--name",
           "node-lost"]
    env = {**cluster.env, "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}
    experiment = tmp_path / "ev" / "node-lost" / "final"
    log = tmp_path / "vtab.log"
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT)
    try:
        wait_until(lambda: finished_trials(experiment) and running_trial(experiment, "w1"),
                   proc, log, 300, "a trial running on w1 after one finished", every=0.2)
        before = finished_trials(experiment)
        lost, lost_pid = running_trial(experiment, "w1")
        killed_at = time.monotonic()
        cluster.kill("w1")
        rc = proc.wait(timeout=400)
        ended = time.monotonic()
    finally:
        stop_process_group(proc)
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    print(f"w1 killed {killed_at - started:.1f} s after the start, the run ended "
          f"{ended - killed_at:.1f} s after the kill")
    after = finished_trials(experiment)
    assert len(after) == 4
    for trial, result in before.items():
        assert after[trial] == result, f"{trial} ran again"
    # The trial lost with w1 ran again, in another process (on w2, the only node with CPUs
    # left), and the command said so in one line, without a traceback.
    assert after[lost]["pid"] != lost_pid
    task, _, seed = lost.replace("-lr0.01-seed", " ").partition(" ")
    retried = [ln for ln in out.splitlines() if "running it again" in ln]
    assert len(retried) == 1, out[-4000:]
    assert f"trial {task} lr 0.01 seed {seed} failed" in retried[0]
    assert retried[0].endswith("(retry 1 of 2)"), retried
    # No traceback of the command's own. (Ray's actors print theirs prefixed with "(name
    # pid=N)": a trial worker SIGTERMed at shutdown inside a weakref callback prints one.)
    assert not re.search(r"^Traceback", out, re.M), out[-4000:]
    report = json.loads((tmp_path / "ev" / "node-lost" / "vtab.json").read_text())
    assert sorted((row["task"], len(row["seeds"])) for row in report["tasks"]) == [
        ("eurosat", 2), ("kitti", 2)]
    assert "Mean of tasks" in out
