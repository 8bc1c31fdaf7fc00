"""Storage faults a cluster meets: an S3 endpoint that goes away for a while (every process
must retry, including the ones that received a pickled copy of the filesystem), and a full
disk under a checkpoint (one line at once, no retries, no staging folder left behind)."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from pipeline import storage
from pipeline.tracking import start_steps
from tests.conftest import free_port, sqlite_store

pytestmark = [pytest.mark.s3]


def _budget_s(attempts: int) -> float:
    """pyarrow's total wait for `attempts` (no jitter: 0, 50, 100, ... ms)."""
    return 0.025 * (2 ** (attempts - 1) - 2)


def _lines(log: str) -> list[str]:
    """Lines as a terminal shows them: progress bars end their updates with "\\r" and move
    the cursor with escape sequences, which precede the next line printed."""
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log).replace("\r", "\n").splitlines()


def _tail(log: str, n: int = 40) -> str:
    """The last lines of a run's output, without Ray Data's progress bars."""
    lines = [ln for ln in _lines(log) if ln.strip() and "row/s" not in ln]
    return "\n".join(lines[-n:])


def _time_to_fail(fs, path: str = "bucket/key") -> float:
    start = time.perf_counter()
    with pytest.raises(OSError, match="connect"):
        fs.get_file_info(path)
    return time.perf_counter() - start


@pytest.fixture
def closed_port(monkeypatch):
    """The AWS settings pointed at a port where nothing listens (connections are refused at
    once, so the time to fail is the retries' backoff alone)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDRECOGNISABLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-recognisable-0451")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_pickled_copies_keep_the_retry_settings(closed_port, monkeypatch):
    import cloudpickle
    import pyarrow.fs as pafs

    # pyarrow's own S3FileSystem pickles without its retry strategy (why ours has a
    # __reduce__ of its own; if this starts failing, pyarrow has fixed it).
    plain = pafs.S3FileSystem(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=9))
    assert "retry_strategy" not in plain.__reduce__()[1][0]

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    fs = storage.s3_filesystem()
    budget = _budget_s(7)                                  # 1.55 s
    for copy in (fs, pickle.loads(pickle.dumps(fs)), cloudpickle.loads(cloudpickle.dumps(fs)),
                 pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(fs))))):
        assert copy.settings == fs.settings and isinstance(copy, pafs.S3FileSystem)
        assert budget - 0.05 <= _time_to_fail(copy) < budget + 1.5
    blob = cloudpickle.dumps(fs)
    assert b"secret-recognisable-0451" not in blob and b"AKIDRECOGNISABLE" not in blob


def test_retries_do_not_run_out_over_a_filesystems_life(closed_port, monkeypatch):
    """pyarrow's AwsStandardS3RetryStrategy stops retrying for good after ~100 retries (the
    SDK's retry quota, never refilled by Arrow); a long run's filesystem must keep retrying."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")            # waits 0 and 50 ms
    fs = storage.s3_filesystem()
    with ThreadPoolExecutor(16) as pool:
        times = list(pool.map(lambda i: _time_to_fail(fs, f"bucket/k{i}"), range(240)))
    assert min(times) >= 0.045, f"{sum(t < 0.045 for t in times)} of 240 calls not retried"


def test_start_up_check_fails_fast_on_a_wrong_endpoint(closed_port):
    start = time.perf_counter()
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        storage.check_bucket("s3://bucket/runs")
    assert time.perf_counter() - start < 5


@pytest.mark.ray
def test_ray_ships_the_filesystem_with_its_retries(ray_local, closed_port, monkeypatch):
    ray = ray_local
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    fs = storage.s3_filesystem()
    assert ray.get(ray.put(fs)).settings == fs.settings

    @ray.remote(num_cpus=0)
    def time_to_fail(fs):
        # The worker's environment names the test endpoint and no AWS_MAX_ATTEMPTS: what it
        # does here comes from the pickled settings alone.
        return type(fs).__name__, fs.settings, _time_to_fail(fs)

    name, settings, took = ray.get(time_to_fail.remote(fs))
    assert name == "RetryingS3FileSystem" and settings == fs.settings
    assert took >= _budget_s(7) - 0.05


@pytest.mark.slow
def test_an_outage_of_15_s_is_ridden_out_by_every_client(s3, s3_server, monkeypatch):
    """boto3 (reads, writes), a pyarrow filesystem and a pickled copy of one, each started
    while the endpoint is down, finish when it is back 15 s later."""
    from infra.s3_proxy import SlowS3Proxy

    storage.write_bytes(f"s3://{s3}/a.bin", b"a" * 1000)
    with SlowS3Proxy(s3_server, latency_s=0, mbps=1000) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fs = storage.s3_filesystem()
        copy = pickle.loads(pickle.dumps(fs))

        def pyarrow_write():
            with copy.open_output_stream(f"{s3}/c.bin") as f:
                f.write(b"c" * 1000)

        def pyarrow_read():
            with fs.open_input_stream(f"{s3}/a.bin") as f:
                return f.read()

        calls = {"boto3 read": lambda: storage.read_bytes(f"s3://{s3}/a.bin"),
                 "boto3 write": lambda: storage.write_bytes(f"s3://{s3}/b.bin", b"b"),
                 "pyarrow read": pyarrow_read, "pyarrow write (pickled copy)": pyarrow_write}
        results: dict[str, object] = {}

        def run(name, call):
            try:
                results[name] = call()
            except Exception as err:  # noqa: BLE001 - reported below
                results[name] = err

        proxy.down()
        start = time.perf_counter()
        threads = [threading.Thread(target=run, args=item) for item in calls.items()]
        for t in threads:
            t.start()
        time.sleep(15)
        assert not results, f"finished during the outage: {results}"
        proxy.up()
        for t in threads:
            t.join(timeout=120)
        took = time.perf_counter() - start
    failed = {k: v for k, v in results.items() if isinstance(v, Exception)}
    assert not failed and len(results) == len(calls), failed
    assert results["boto3 read"] == results["pyarrow read"] == b"a" * 1000
    assert took < 60, f"{took:.0f} s to recover"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.read_bytes(f"s3://{s3}/c.bin") == b"c" * 1000


@pytest.mark.slow
@pytest.mark.ray
def test_pretraining_rides_out_a_15_s_outage(s3, s3_server, tmp_path):
    """The endpoint goes away for 15 s while a run reads its shards from S3 and writes
    checkpoints there (Train workers, read tasks and the Train controller each hold a pickled
    filesystem): the run finishes with every checkpoint, and no worker group restarted."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import boto3
    from mlflow.tracking import MlflowClient

    from infra.s3_proxy import SlowS3Proxy
    from pipeline.data import shards
    from pipeline.train import checkpoints
    from tests.conftest import S3_TEST_ENV, stop_process_group

    root = Path(__file__).resolve().parents[2]
    shards.write_shards(shards.grating_images(num_samples=1280, num_classes=4, image_size=48,
                                              val_fraction=0),
                        f"s3://{s3}/data", shards.ShardOptions(shard_size_mb=0.2),
                        log=lambda m: None)
    direct = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")

    def steps() -> list[str]:
        keys = [o["Key"] for o in direct.list_objects_v2(Bucket=s3, Prefix="runs/outage/")
                .get("Contents", [])]
        return sorted({m.group(1) for k in keys
                       if (m := re.search(r"step_(\d+)/train_state.json", k))})

    with SlowS3Proxy(s3_server, latency_s=0, mbps=1000) as proxy:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
        env.update(S3_TEST_ENV, AWS_ENDPOINT_URL=proxy.url, PYTHONPATH=str(root),
                   RAY_USAGE_STATS_ENABLED="0",
                   MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"))
        cmd = [sys.executable, "jobs/pretrain.py", "--preset", "smoke", "--data",
               f"s3://{s3}/data", "--out", f"s3://{s3}/runs", "--name", "outage",
               "--set", "data.augment=resize", "--set", "model.image_size=48",
               "--set", "model.hidden_size=128", "--set", "model.mlp_dim=512",
               "--set", "train.total_steps=40", "--set", "checkpoint.every=10",
               "--set", "checkpoint.keep=20", "--set", "probe.every=0",
               "--set", "train.log_every=10"]
        log_path = tmp_path / "run.log"
        job = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"),
                               stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
        try:
            deadline = time.monotonic() + 300
            while not steps():
                assert job.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in 300 s"
                time.sleep(0.2)
            requests_before = sum(proxy.requests.values())
            proxy.down()
            at_outage = steps()
            time.sleep(15)
            proxy.up()
            assert job.poll() is None, "the run ended during the outage: " + \
                log_path.read_text()[-3000:]
            rc = job.wait(timeout=300)
        finally:
            stop_process_group(job)
    log = log_path.read_text()
    assert rc == 0, log[-4000:]
    assert "finished at step 40" in log, log[-3000:]
    assert "RETRY" not in log, "a worker group was restarted"
    # The libraries' INFO lines stay out of the run's output (botocore said "Found credentials
    # in environment variables." for every S3 call of every worker), as does Ray Train's
    # preemption watcher's restart warning on a local Ray.
    assert "Found credentials" not in log and "PreemptionWatcher" not in log, log[-3000:]
    assert at_outage[-1] < "00000040" and sum(proxy.requests.values()) > requests_before
    assert steps() == [f"{s:08d}" for s in range(10, 41, 10)]
    assert checkpoints.latest(f"s3://{s3}/runs/outage").endswith("step_00000040")
    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    run = client.search_runs(client.get_experiment_by_name("vit-smoke").experiment_id)[0]
    assert start_steps(run) == [0], "one start, no restart"


def test_staging_folders_of_gone_processes_are_swept(tmp_path):
    import os
    import subprocess
    import sys

    from pipeline.train import checkpoints

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    left = tmp_path / f"{checkpoints.STAGING_PREFIX}{gone}-20-abc"
    live = tmp_path / f"{checkpoints.STAGING_PREFIX}{os.getpid()}-30-def"
    other = tmp_path / f"{checkpoints.STAGING_PREFIX}x-40-ghi"          # not ours: kept
    for folder in (left, live, other):
        (folder / "state").mkdir(parents=True)
    assert checkpoints.sweep_staging(str(tmp_path)) == [left]
    assert not left.exists() and live.exists() and other.exists()


@pytest.fixture
def small_disk():
    """A 2 MiB tmpfs (as root; skipped where mounting is not allowed): a real full disk,
    ENOSPC from the kernel, without filling the machine's. At a short path: as TMPDIR, the
    socket paths of the Ray this run starts (its dashboard's) must stay within 107 bytes,
    which pytest's folders under xdist are not (the dashboard failed, and the run waited
    for it: 90 s in CI against 25 s)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    mount = Path(tempfile.mkdtemp(prefix="vfd", dir="/tmp"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(mount, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:100]})")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


@pytest.fixture
def short_tmp():
    """A folder at a short path, for TMPDIR (see small_disk)."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="vst", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("full", ["storage", "staging"])
def test_a_full_disk_stops_the_run_at_once_with_one_line(full, small_disk, short_tmp, tmp_path):
    """The checkpoint storage (`--out` on a full disk: the upload fails) or the local
    staging folder (TMPDIR on a full disk: DCP's write fails, with no errno in torch's
    message) runs out of space at the first checkpoint: the run stops at once, with one line
    naming the place and the fix and no traceback, no retry, the MLflow run FAILED, every
    metric step logged once, and no staging folder left."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[2]
    staging = small_disk if full == "staging" else short_tmp
    runs = small_disk if full == "storage" else tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(root), RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(staging),
               RAY_TMPDIR="/tmp",                   # Ray's session folder stays off TMPDIR
               MLFLOW_TRACKING_URI=sqlite_store(tmp_path / "mlflow.db"))
    cmd = [sys.executable, "jobs/pretrain.py", "--preset", "smoke", "--out", str(runs),
           "--name", "full", "--set", "model.hidden_size=128", "--set", "model.mlp_dim=512",
           "--set", "train.total_steps=40", "--set", "checkpoint.every=10",
           "--set", "train.log_every=2", "--set", "probe.every=0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    log = out.stdout + out.stderr
    (tmp_path / "run.log").write_text(f"{log}\nexit code {out.returncode}\n")
    assert out.returncode != 0, _tail(log)
    errors = [ln for ln in _lines(log) if ln.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and str(small_disk) in errors[0] and \
        ("TMPDIR" if full == "staging" else "--out") in errors[0], errors or _tail(log)
    assert "RETRY" not in log, "a worker group was restarted"
    # Ray's tracebacks of the failed upload and of the training function's error are not
    # printed for what the line says (loop._SaidInOneLine).
    assert "Traceback" not in log and "upload failed in the background" not in log, \
        _tail(log)
    assert not list(staging.glob("vit-ckpt-*")), "a staging folder was left behind"
    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    (run,) = client.search_runs(client.get_experiment_by_name("vit-smoke").experiment_id)
    assert run.info.status == "FAILED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps and len(steps) == len(set(steps)), f"steps logged twice: {sorted(steps)}"
    assert max(steps) < 40, "the run went on after its first checkpoint failed"
