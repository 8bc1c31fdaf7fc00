"""Runs that are interrupted the way cluster runs are: the driver SIGKILLed while a checkpoint
uploads (then the same command again), and a worker SIGKILLed mid-epoch (Ray Train restarts
the worker group). Each run reads WebDataset shards over several epochs through 2 workers,
and writes an audit of every sample each worker trained on (`data.trace_dir`), from which the
test rebuilds the history of the final model independently of the code's own bookkeeping:

- no sample was trained on twice; every sample of each finished epoch was trained on once,
  except at most what the workers' shuffle buffers and prefetch queues still held when the
  run ended (as in an uninterrupted run). Samples the interrupted incarnation trained on after
  the restored checkpoint are rolled back with the model: they are in no history of the
  final weights, and are trained on again;
- the data position recorded in the final checkpoint is exactly the set of samples read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from pipeline.data import shards
from pipeline.data.plan import DataPosition, StreamPlan
from pipeline.tracking import start_steps
from pipeline.train import checkpoints
from pipeline.weights import load_vit
from tests.conftest import kill_tree, sqlite_store, stop_process_group

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Per worker: the shuffle buffer, and 2 prefetched micro-batches of 32 (global batch 64 on
# 2 workers): what can still be waiting, untrained, when a run ends.
SHUFFLE = 64
IN_FLIGHT = 2 * (SHUFFLE + 2 * 32)


def make_data(path: Path, samples: int = 320) -> dict:
    shards.write_shards(shards.grating_images(num_samples=samples, num_classes=4, image_size=32,
                                              val_fraction=0.0),
                        str(path), shards.ShardOptions(shard_size_mb=0.05), log=lambda m: None)
    return json.loads((path / "manifest.json").read_text())


def history(trace_dir: Path) -> tuple[list[tuple[int, int, int]], int]:
    """The samples behind the final weights, from the workers' audit files: each restart
    ("-1 <start step>") discards what its predecessors trained after that step.
    -> (samples, number of restarts)."""
    kept: list[tuple[int, int, int]] = []
    restarts = 0
    for path in sorted(trace_dir.glob("rank*.txt")):
        by_step: dict[int, list] = {}
        starts = 0
        for line in path.read_text().split("\n"):
            if not line.strip():
                continue
            step, epoch, shard, index = map(int, line.split())
            if step == -1:
                starts += 1
                by_step = {s: v for s, v in by_step.items() if s <= epoch}  # epoch = start
                continue
            by_step.setdefault(step, []).append((epoch, shard, index))
        restarts = max(restarts, starts - 1)
        kept += [x for v in by_step.values() for x in v]
    return kept, restarts


def check_every_sample_once(samples, manifest: dict, total: int, in_flight: int) -> None:
    """No sample trained twice; every sample of the epochs the run passed trained once, but
    for at most `in_flight` still waiting in the workers' shuffle buffers and prefetch queues
    when the run ended (as in any uninterrupted run)."""
    counts = Counter(samples)
    twice = [s for s, c in counts.items() if c > 1]
    assert not twice, f"{len(twice)} samples trained twice, e.g. {twice[:3]}"
    assert len(samples) == total
    sizes = [s["samples"] for s in manifest["splits"]["train"]["shards"]]
    full_epochs = total // sum(sizes)
    expected = {(e, shard, i) for e in range(full_epochs) for shard, n in enumerate(sizes)
                for i in range(n)}
    missing = expected - set(counts)
    assert len(missing) <= in_flight, f"{len(missing)} samples never trained (bound {in_flight})"


def check_recorded_position(checkpoint: str, samples, manifest: dict) -> None:
    doc = checkpoints.read_state(checkpoint)
    position = DataPosition.from_dict(doc["data_position"])
    plan = StreamPlan.from_manifest(manifest, "train", 0)
    epochs = max(e for e, _, _ in samples) + 1
    remaining = {(r["epoch"], r["shard"], i) for r in plan.reads(position, epochs)
                 for i in range(r["samples"]) if i not in set(r["skip"])}
    every = {(e, shard, i) for e in range(epochs) for shard, n in enumerate(plan.sizes)
             for i in range(n)}
    assert every - remaining == set(samples), "the position is what the workers trained on"


def command(tmp_path: Path, data: Path, name: str, *sets: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--preset", "smoke", "--data",
            str(data), "--out", str(tmp_path / "runs"), "--name", name, "--workers", "2",
            "--cpus-per-worker", "0.5",      # 2 cores: leave one for the data tasks
            "--set", "data.augment=resize", "--set", "probe.every=0",
            "--set", "train.log_every=5", "--set", f"data.trace_dir={tmp_path / 'trace'}",
            "--set", f"data.shuffle_buffer={SHUFFLE}",
            *[x for s in sets for x in ("--set", s)]]


def test_driver_killed_while_a_checkpoint_uploads_then_the_same_command(tmp_path):
    manifest = make_data(tmp_path / "data")
    # 5 steps an epoch (320 samples, batch 64), 8 epochs; a checkpoint every 10 steps.
    cmd = command(tmp_path, tmp_path / "data", "killed", "train.total_steps=40",
                  "checkpoint.every=10", "model.hidden_size=128", "model.mlp_dim=512")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "first.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (run_dir / "step_00000020").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.02)
        killed = kill_tree(proc.pid)            # the driver, its Ray, its workers, at once
    finally:
        stop_process_group(proc)
    assert len(killed) > 3, "the driver and its Ray processes"
    assert (run_dir / "step_00000010").exists() and (run_dir / "step_00000020").exists()
    assert not (run_dir / "step_00000030").exists(), "killed before the next checkpoint"
    if checkpoints.is_complete(str(run_dir / "step_00000020")):
        # The kill came after the upload finished: leave what a kill a moment earlier leaves.
        (run_dir / "step_00000020" / checkpoints.STATE_FILE).unlink()
    assert checkpoints.latest(str(run_dir)) == str(run_dir / "step_00000010")
    # A kill right after Ray created the folder leaves it empty: nothing to skip then.
    partial = any(p.is_file() for p in (run_dir / "step_00000020").rglob("*"))

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "finished at step 40" in log
    assert "continuing it" in log and "step_00000010" in log
    assert ("skipping incomplete checkpoint" in log) == partial
    final = checkpoints.latest(str(run_dir))
    assert final == str(run_dir / "step_00000040") and load_vit(final)
    samples, restarts = history(tmp_path / "trace")
    assert restarts == 1
    check_every_sample_once(samples, manifest, total=40 * 64, in_flight=IN_FLIGHT)
    check_recorded_position(final, samples, manifest)


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _kill_a_worker_mid_epoch(run_dir: Path, killed: list, stop: threading.Event):
    # Kill a worker as soon as the step-10 checkpoint is complete: mid-epoch (7.5 steps an
    # epoch), and before the end of the run.
    while not stop.is_set():
        if checkpoints.is_complete(str(run_dir / "step_00000010")):
            # A Train worker of this session's Ray (a descendant of this process), never
            # one of another Ray on the machine.
            pids = [p.pid for p in psutil.Process().children(recursive=True)
                    if _cmdline(p).startswith("ray::RayTrainWorker")]
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.05)


def test_worker_killed_mid_epoch_resumes_the_stream_where_the_checkpoint_was(ray_local,
                                                                              tmp_path):
    from pipeline.train.config import apply_overrides, smoke
    from pipeline.train.run import pretrain

    manifest = make_data(tmp_path / "data", samples=480)
    cfg = apply_overrides(smoke(), [
        "run.name=worker-killed", f"run.storage={tmp_path / 'runs'}", "scale.num_workers=2",
        "scale.cpus_per_worker=0.5", "data.source=shards", f"data.uri={tmp_path / 'data'}",
        "data.augment=resize", f"data.trace_dir={tmp_path / 'trace'}",
        f"data.shuffle_buffer={SHUFFLE}",
        "train.total_steps=30", "checkpoint.every=10", "train.log_every=5",
        "probe.every=0", "train.max_failures=2", "model.hidden_size=128",
        "model.mlp_dim=512"])
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_a_worker_mid_epoch,
                              args=(tmp_path / "runs" / "worker-killed", killed, stop),
                              daemon=True)
    killer.start()
    try:
        out = pretrain(cfg, tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    finally:
        stop.set()
        killer.join()
    assert killed and out.step == 30
    from mlflow.tracking import MlflowClient

    starts = start_steps(MlflowClient(sqlite_store(tmp_path / "mlflow.db")).get_run(out.run_id))
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 10, \
        f"one MLflow run, restarted from a checkpoint, not from scratch: {starts}"
    samples, restarts = history(tmp_path / "trace")
    assert restarts == 1
    check_every_sample_once(samples, manifest, total=30 * 64, in_flight=IN_FLIGHT)
    check_recorded_position(out.checkpoint, samples, manifest)
