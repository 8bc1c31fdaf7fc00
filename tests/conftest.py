"""Shared fixtures: real services started (and stopped) by the tests."""

from __future__ import annotations

import functools
import os
import socket

import pytest

# `ray start --block` drains its node for up to 30 s on SIGTERM before it stops (Ray 2.60's
# `_drain_node_before_shutdown`, for Serve replicas), so each head a test stopped took 20-35 s
# to go. The tests' heads and nodes serve nothing to drain: they stop in a few seconds.
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP: moto's server on 127.0.0.1 (as Ray's own tests use)."""
    import logging

    ThreadedMotoServer = pytest.importorskip("moto.server").ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Point the standard AWS settings at the test endpoint; yields a fresh bucket name."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for key, value in S3_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
    yield bucket


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: `-n 2 --dist loadscope --no-loadscope-reorder`, one
    module per worker at a time, so a module's fixtures start once, in this order rather than
    xdist's by test count), the heaviest modules go first and the quick ones fill in at the
    end, so that no worker is left with one long module while the other idles. Weight: the
    module's seconds in tests/durations.json (a recorded run; refreshed by
    tests/durations.py), else 30 s per slow test (most start Ray) and 0.5 s per other."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "durations.json").read_text())
    weight: dict[str, float] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        weight[module] = weight.get(module, 0) + (30 if item.get_closest_marker("slow")
                                                  else 0.5)
    weight.update({m: s for m, s in recorded.items() if m in weight})
    order = {m: i for i, m in enumerate(sorted(weight, key=lambda m: -weight[m]))}
    items.sort(key=lambda item: order[item.nodeid.split("::")[0]])    # stable within a module


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch from oversubscribing the 2-core CI machine (shared by the xdist workers)."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    yield


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STRAYS = ("mlflow.db", "mlruns", "mlartifacts")


@pytest.fixture(autouse=True)
def _no_default_mlflow_store():
    """Fail the test that leaves MLflow's default store (./mlflow.db, ./mlruns) in the
    checkout: some process of it logged without the tracking URI it was given."""
    before = {name for name in _STRAYS if os.path.exists(os.path.join(_ROOT, name))}
    yield
    new = {name for name in _STRAYS if os.path.exists(os.path.join(_ROOT, name))} - before
    assert not new, f"MLflow's default store was written in the checkout: {sorted(new)}"


# This process's multiprocessing resource tracker (started by the first pool or semaphore a
# test makes, and living as long as pytest) starts now, before any test's mark.
if os.path.isdir("/proc"):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()

# Every process a test starts carries this variable (a command, the Ray it starts, that Ray's
# workers: each inherits it), so that what is left when the test ends can be found.
_MARK = "VIT_TEST_PROCESS"
_LEFT_GRACE_S = 20.0


def _marked(mark: str) -> list[str]:
    """'pid command' of the live processes whose environment carries `mark`."""
    from pipeline.interrupt import processes_with

    found = []
    for pid in processes_with(_MARK, mark):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(f"{pid} {command[:80]}")
    return found


@pytest.fixture(autouse=True)
def _no_process_left():
    """Fail the test that leaves a process of its own alive (a command's Ray that outlived
    it, an orphaned actor) `_LEFT_GRACE_S` after it ended, and kill what is left. Session
    and module services start before the mark is set (pytest sets up wider fixtures first),
    so they do not carry it."""
    import signal
    import time
    import uuid

    if not os.path.isdir("/proc"):
        yield
        return
    mark = uuid.uuid4().hex[:12]
    os.environ[_MARK] = mark
    try:
        yield
    finally:
        os.environ.pop(_MARK, None)
    deadline = time.monotonic() + _LEFT_GRACE_S
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.25)
    for line in left:
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"{len(left)} processes of this test still alive {_LEFT_GRACE_S:.0f} s " \
                     f"after it ended (killed now): {left[:6]}"


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


# For a Ray started without a dashboard: its processes' state API. Such a Ray still names
# 127.0.0.1:8265 as its dashboard, so Ray Train's placement-group cleaner (on ray_local
# before it ran as a command's own local Ray does, without one) asked whatever
# dashboard was there (a command's local Ray in the other xdist worker) for its controller,
# did not find it, took it for dead and removed the placement group of a healthy run (CI:
# test_resume_continues_the_run restarted its workers). Nothing listens on port 1: the
# cleaner's queries fail, and it keeps watching.
NO_STATE_API = "http://127.0.0.1:1"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster for the session (4 logical CPUs on the 2-core machine, so that
    2 Train workers and the data tasks fit); shut down, with all its processes, at the end.
    Its workers get the S3 test endpoint through the standard AWS variables, as the nodes of
    a cluster get theirs: every process resolves storage from its own environment."""
    ray = pytest.importorskip("ray")     # GPU machines run the plain-PyTorch tests without it

    from pipeline import cli

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # As the commands start theirs (cli.ray_init_args): its processes know its address, so
    # that Ray Train finds this cluster, not another test's running at the same time.
    args = cli.ray_init_args(None, PYTHONPATH=root, AWS_ENDPOINT_URL=s3_server,
                             RAY_API_SERVER_ADDRESS=NO_STATE_API, **S3_TEST_ENV)
    # Every process of this Ray inherits a mark of its own (set while Ray starts its daemons,
    # whose workers inherit theirs), so that what outlives its shutdown can be found.
    import uuid

    mark = uuid.uuid4().hex
    os.environ[_SESSION_RAY] = mark
    try:
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, **args)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)   # not for the processes tests start
        os.environ.pop(_SESSION_RAY, None)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # This Ray ends with the session, as a command's own local Ray ends with the command:
    # runs on it go without Ray Train's placement-group cleaner, as theirs do (one actor
    # process less a run).
    from pipeline.train import failures

    failures.own_local_ray(True)
    try:
        yield ray
    finally:
        failures.own_local_ray(False)
        ray.shutdown()
        _sweep_session_ray(mark)


_SESSION_RAY = "VIT_TEST_SESSION_RAY"


def _sweep_session_ray(mark: str, grace_s: float = 10.0) -> None:
    """SIGKILL what is left of the session's Ray `grace_s` after its shutdown: its workers
    go with the raylet, but a Train controller whose core worker had shut down was seen
    hanging on its way out, orphaned, after the suite."""
    import time

    from pipeline import interrupt

    deadline = time.monotonic() + grace_s
    while interrupt.processes_with(_SESSION_RAY, mark) and time.monotonic() < deadline:
        time.sleep(0.25)
    if killed := interrupt.kill_processes_with(_SESSION_RAY, mark):
        print(f"\nthe session's Ray left {len(killed)} process(es) after its shutdown "
              f"(killed): {killed}")


def _wait_http(url: str, timeout: float, proc=None) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 with token auth): it is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def stop_process_group(proc, timeout: float = 20) -> None:
    """SIGTERM the process group of `proc`, then SIGKILL what is left: no orphans."""
    import signal
    import subprocess

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants at once (a driver and the Ray it started:
    raylet, GCS, workers), as a lost machine would. -> the pids killed."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if not stat.isdigit():
            continue
        try:
            with open(f"/proc/{stat}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on free ports, in its own process group, with token auth
    (Ray's default); yields (dashboard address, environment for `ray job submit`)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    dash = free_port()
    short_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # socket paths must stay < 108 B
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--num-cpus=4",
           f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--temp-dir={short_tmp}", "--include-dashboard=true"]
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "head.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 180, proc)
        from infra.local_stack import wait_for_job_agent

        wait_for_job_agent(f"http://127.0.0.1:{dash}")
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_process_group(proc)
        shutil.rmtree(short_tmp, ignore_errors=True)


@functools.cache
def _empty_store() -> str:
    """An empty MLflow SQLite store, made once per test process (removed at its exit)."""
    import atexit
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    folder = tempfile.mkdtemp(prefix="vit-mlflow-template")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    template = os.path.join(folder, "mlflow.db")
    MlflowClient(f"sqlite:///{template}").search_experiments()
    return template


def sqlite_store(db) -> str:
    """The tracking URI of an MLflow store at `db` (a SQLite file): an empty store as MLflow
    makes it (`_empty_store`), copied there unless `db` exists already. MLflow builds a new
    store through its schema migrations, 1.3 against 0.6 CPU-s to open one, in every process
    that opens it; the tests of our code need a store, not MLflow's migrations (the default
    store's creation is tested as a user meets it, in test_tracking)."""
    import shutil
    from pathlib import Path

    db = Path(db)
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), db)
    return f"sqlite:///{db}"


class MlflowServer:
    """A real MLflow tracking server process on 127.0.0.1 (SQLite backend, local artifacts).
    `stop()` / `start()` simulate an outage; the data survives a restart."""

    def __init__(self, root):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        import subprocess
        import sys

        from infra import local_stack

        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", sqlite_store(f"{self.root}/mlflow.db"),
             "--artifacts-destination", f"{self.root}/artifacts", "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=open(f"{self.root}/server.log", "ab"),
            start_new_session=True, env={**os.environ, **local_stack.MLFLOW_SERVER_ENV})
        _wait_http(f"{self.uri}/health", 120, self.proc)
        return self

    def stop(self):
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()
