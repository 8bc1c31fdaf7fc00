"""Where the seconds go between a command and its first training step, and after the last.

Each scenario runs a command as a user would, with VIT_TIMELINE set (pipeline/timeline.py):
the driver, the Train workers and the Tune trials mark their phases in one file, and this
script prints the phases side by side with the training time itself.

    pretrain-local   `vit-pretrain --preset smoke` starting its own local Ray
    pretrain-submit  the same through `ray job submit` to a running head (started here first)
    vtab-local       `vit-vtab --preset demo` on one generated task: its first trial step
    tools            vit-export, vit-analyze, vit-shards on small inputs, and the time each
                     command (pretraining and VTAB too) takes to refuse bad input
    stack            stopping: a Ray head on SIGTERM with and without Ray's node drain, and
                     the local stack up and down (what the demo and the tests pay)

    python bench/startup.py                          # all, each once (~4 min on 2 cores)
    python bench/startup.py --only pretrain-local --repeats 3

Goals (issue 24, on the 2-core dev machine): first step within 15 s of the command on a
running head, within 25 s with a fresh local Ray; start-up plus shut-down at most twice the
smoke preset's training time; bad input refused in a few seconds, before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import timeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# (label, from event, to event): consecutive phases of a pretraining run. Events missing from
# a run (e.g. a driver without MLflow) are skipped.
PRETRAIN_PHASES = (
    ("python start + imports", "launch", "driver.imports"),
    ("Ray start / connect", "driver.imports", "driver.ray_ready"),
    ("driver checks, data plan, MLflow run", "driver.ray_ready", "driver.fit"),
    ("Train controller + worker group", "driver.fit", "worker.start"),
    ("worker: model, optimizer", "worker.start", "worker.model"),
    ("worker: tracker, probe, metrics", "worker.model", "worker.ready"),
    ("dataset: first batch", "worker.ready", "worker.first_batch"),
    ("first step", "worker.first_batch", "worker.first_step"),
    ("TRAINING (first to last step)", "worker.first_step", "worker.last_step"),
    ("final checkpoint, worker end", "worker.last_step", "worker.end"),
    ("worker group + controller shutdown", "worker.end", "driver.fit_done"),
    ("driver finish (prune, MLflow)", "driver.fit_done", "driver.done"),
    ("Ray shutdown + exit", "driver.done", "exit"),
)
VTAB_PHASES = (
    ("python start + imports", "launch", "driver.imports"),
    ("checks, weights, Ray start", "driver.imports", "driver.ray_ready"),
    ("task data decoded (Ray tasks)", "driver.ray_ready", "driver.tune"),
    ("Tune: first trial started", "driver.tune", "trial.start"),
    ("trial: model built, first step", "trial.start", "trial.first_step"),
    ("TRIALS (first step to the last trial's end)", "trial.first_step", "driver.tune_done"),
    ("report, MLflow, exit", "driver.tune_done", "exit"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_timed(cmd: list[str], env: dict, log: Path, timeout: float = 900) -> dict:
    """Run `cmd` with a fresh timeline -> {event: first time (s after launch)}, rc."""
    path = log.with_suffix(".timeline")
    path.unlink(missing_ok=True)
    env = {**env, timeline.ENV: str(path)}
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              timeout=timeout)
    end = time.time()
    events = {"launch": 0.0, "exit": end - t0}
    if path.exists():
        for m in timeline.read(str(path)):
            events.setdefault(m["event"], m["t"] - t0)
            if m["event"].endswith(("last_step", "tune_done", "end")):
                events[m["event"]] = m["t"] - t0        # the last one of several processes
    events["rc"] = proc.returncode
    return events


def phases(runs: list[dict], table) -> list[tuple[str, float]]:
    rows = []
    for label, a, b in table:
        spans = [r[b] - r[a] for r in runs if a in r and b in r]
        if spans:
            rows.append((label, statistics.median(spans)))
    return rows


def report(title: str, runs: list[dict], table, first: str, last: str, train: str) -> dict:
    print(f"\n{title} ({len(runs)} run{'s' if len(runs) > 1 else ''}; median s)")
    for r in runs:
        if r["rc"] != 0:
            print(f"  a run FAILED (exit {r['rc']}); see its log")
    for label, s in phases(runs, table):
        print(f"  {label:<44} {s:7.1f}")
    med = {k: statistics.median(r[k] for r in runs if k in r) if any(k in r for r in runs)
           else float("nan") for k in (first, last, "exit")}
    t_first, t_train = med[first], statistics.median(
        [r[train[1]] - r[train[0]] for r in runs if train[0] in r and train[1] in r] or
        [float("nan")])
    overhead = med["exit"] - t_train
    print(f"  {'command -> first step':<44} {t_first:7.1f}")
    print(f"  {'total':<44} {med['exit']:7.1f}")
    print(f"  {'start-up + shut-down / training':<44} {overhead:7.1f} / {t_train:.1f} = "
          f"{overhead / t_train if t_train else float('nan'):.1f}x")
    return {"first_step_s": t_first, "total_s": med["exit"], "train_s": t_train}


def pretrain_args(work: Path, name: str) -> list[str]:
    return ["jobs/pretrain.py", "--preset", "smoke", "--out", str(work / "runs"),
            "--name", name]


def base_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT),
               MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db")
    return env


def pretrain_local(work: Path, repeats: int) -> dict:
    env = base_env(work)
    runs = [run_timed([sys.executable, *pretrain_args(work, f"local{i}")], env,
                      work / f"pretrain-local{i}.log") for i in range(repeats)]
    return report("vit-pretrain --preset smoke, fresh local Ray", runs, PRETRAIN_PHASES,
                  "worker.first_step", "worker.last_step",
                  ("worker.first_step", "worker.last_step"))


def start_head(work: Path, drain_s: str = "0") -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` with job submission, up when its job agent answers.
    `drain_s`: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, how long the head drains its node on
    SIGTERM before it stops (Ray's default 30; the local stack's and the tests' 0)."""
    tmp = tempfile.mkdtemp(prefix="bh", dir="/tmp")       # socket paths stay < 108 bytes
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}",
           "--include-dashboard=true", f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": drain_s}
    head = subprocess.Popen(cmd, env=env, stdout=open(work / "head.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from infra.local_stack import wait_for_job_agent

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            wait_for_job_agent(address, wait=True)     # the head idle when timing starts
            return head, address, tmp
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise SystemExit("the Ray head did not come up; see head.log")


def pretrain_submit(work: Path, repeats: int) -> dict:
    head, address, tmp = start_head(work)
    try:
        env = {**base_env(work), "RAY_AUTH_MODE": "token"}   # Ray's default, as the head's
        runs = []
        for i in range(repeats):
            runtime = json.dumps({"env_vars": {
                "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
                timeline.ENV: str(work / f"pretrain-submit{i}.timeline")}})
            cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir",
                   str(ROOT), "--runtime-env-json", runtime, "--", sys.executable,
                   *pretrain_args(work, f"submit{i}")]
            runs.append(run_timed(cmd, env, work / f"pretrain-submit{i}.log"))
        return report("the same through `ray job submit` to a running head", runs,
                      PRETRAIN_PHASES, "worker.first_step", "worker.last_step",
                      ("worker.first_step", "worker.last_step"))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def small_checkpoint(work: Path) -> Path:
    import torch

    from pipeline.model import ViT, ViTConfig
    from pipeline.weights import save_vit

    torch.manual_seed(0)
    return save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=2,
                                  num_heads=2, mlp_dim=64, num_classes=10)), work / "ckpt")


def vtab_local(work: Path, repeats: int) -> dict:
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    ckpt = small_checkpoint(work)
    write_grating_task(work / "vtab-1k", BY_NAME["eurosat"])
    env = base_env(work)
    runs = [run_timed([sys.executable, "eval/vtab.py", "--checkpoint", str(ckpt), "--data",
                       str(work / "vtab-1k"), "--tasks", "eurosat", "--preset", "demo",
                       "--out", str(work / "ev"), "--name", f"v{i}"], env,
                      work / f"vtab{i}.log") for i in range(repeats)]
    return report("vit-vtab --preset demo, 1 task (2 selection + 1 final trial), fresh local "
                  "Ray", runs, VTAB_PHASES, "trial.first_step", "driver.tune_done",
                  ("trial.first_step", "driver.tune_done"))


def tools(work: Path) -> dict:
    """Wall time of the small commands, and of every command refusing bad input."""
    env = base_env(work)
    ckpt = small_checkpoint(work)
    (work / "a-file").write_text("not a folder")

    def wall(cmd):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, *cmd], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        return time.perf_counter() - t, out.returncode, (out.stderr.strip().splitlines()
                                                       or [""])[-1][:90]

    cases = [
        ("vit-shards synthetic (64 images)", ["jobs/make_shards.py", "synthetic", "--out",
                                              str(work / "shards"), "--num-samples", "64",
                                              "--image-size", "32"]),
        ("vit-export --format hf", ["jobs/export.py", "--checkpoint", str(ckpt), "--out",
                                    str(work / "export")]),
        ("vit-analyze (16 images, no MLflow)", ["jobs/analyze.py", "--checkpoint", str(ckpt),
                                                "--data", str(work / "shards"), "--num-images",
                                                "16", "--out", str(work / "an"),
                                                "--no-mlflow"]),
        ("REFUSE pretrain: --data missing", [*pretrain_args(work, "bad1"), "--data",
                                             str(work / "missing")]),
        ("REFUSE pretrain: --out is a file", ["jobs/pretrain.py", "--preset", "smoke",
                                                  "--out", str(work / "a-file")]),
        ("REFUSE pretrain: --init missing", [*pretrain_args(work, "bad3"), "--init",
                                             str(work / "missing")]),
        ("REFUSE pretrain: --out under a file", [*pretrain_args(work, "bad5"), "--out",
                                                 str(work / "a-file" / "runs")]),
        ("REFUSE pretrain: split not in data", [*pretrain_args(work, "bad6"), "--data",
                                                str(work / "shards"), "--set",
                                                "data.split=nosuch"]),
        ("REFUSE pretrain: --init not a ViT", [*pretrain_args(work, "bad7"), "--init",
                                               str(work / "shards" / "manifest.json")]),
        ("REFUSE pretrain: --resume no checkpoint", [*pretrain_args(work, "bad8"),
                                                     "--resume", str(ckpt)]),
        ("REFUSE pretrain: placeholder", ["jobs/pretrain.py", "--preset", "vit_b16_i21k"]),
        ("REFUSE vtab: --data missing", ["eval/vtab.py", "--checkpoint", str(ckpt), "--data",
                                         str(work / "missing"), "--tasks", "eurosat"]),
        ("REFUSE vtab: no such task folder", ["eval/vtab.py", "--checkpoint", str(ckpt),
                                               "--data", str(work / "shards"), "--tasks",
                                               "eurosat"]),
        ("REFUSE vtab: --checkpoint not a ViT", ["eval/vtab.py", "--checkpoint",
                                                 str(work / "shards"), "--data",
                                                 str(work / "shards"), "--tasks", "eurosat"]),
        ("REFUSE vtab: unknown task", ["eval/vtab.py", "--checkpoint", str(ckpt), "--data",
                                       str(work / "vtab-1k"), "--tasks", "nosuch"]),
        ("REFUSE export: --checkpoint missing", ["jobs/export.py", "--checkpoint",
                                                 str(work / "missing"), "--out",
                                                 str(work / "x")]),
        ("REFUSE analyze: --data missing", ["jobs/analyze.py", "--checkpoint", str(ckpt),
                                            "--data", str(work / "missing"), "--no-mlflow"]),
        ("REFUSE shards: --data missing", ["jobs/make_shards.py", "folder", "--data",
                                           str(work / "missing"), "--out", str(work / "y")]),
    ]
    print("\nsmall commands and refusals (wall s, exit code, last line)")
    figures = {}
    for label, cmd in cases:
        s, rc, last = wall(cmd)
        figures[label] = s
        print(f"  {label:<40} {s:6.1f}  {rc:>3}  {last}")
    return figures


def stack(work: Path, repeats: int) -> dict:
    """Stopping: a bare `ray start --head --block` from SIGTERM to exit with Ray's default
    node drain and without it, and the local stack (infra/local_stack.py) up and down in one
    process, as the demo uses it."""
    from infra import local_stack

    figures: dict[str, float] = {}
    print("\nstopping a Ray head and the local stack (median s)")
    for label, drain in (("Ray head SIGTERM -> exit, drain 30 s (Ray)", "30"),
                         ("Ray head SIGTERM -> exit, no drain (ours)", "0")):
        took = []
        for _ in range(repeats):
            head, _, tmp = start_head(work, drain)
            start = time.monotonic()
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
            took.append(time.monotonic() - start)
            subprocess.run(["pkill", "-9", "-f", tmp], check=False)
            shutil.rmtree(tmp, ignore_errors=True)
        figures[label] = statistics.median(took)
    ups, downs = [], []
    for i in range(repeats):
        root = work / f"stack{i}"
        start = time.monotonic()
        local_stack.up(root, num_cpus=2)
        ups.append(time.monotonic() - start)
        start = time.monotonic()
        local_stack.down(root)
        downs.append(time.monotonic() - start)
    figures["local stack up (Ray head, S3, MLflow)"] = statistics.median(ups)
    figures["local stack down, same process"] = statistics.median(downs)
    for label, seconds in figures.items():
        print(f"  {label:<46} {seconds:6.1f}")
    return figures


SCENARIOS = {"pretrain-local": pretrain_local, "pretrain-submit": pretrain_submit,
             "vtab-local": vtab_local, "tools": lambda work, repeats: tools(work),
             "stack": stack}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(SCENARIOS), action="append",
                    help="run these scenarios only (repeatable; default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per scenario (median)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vit-startup-"))
    print(f"{os.cpu_count()} CPUs; logs and timelines in {work}")
    try:
        for name in args.only or SCENARIOS:
            SCENARIOS[name](work, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
