"""One writer per run: the lease in the run folder, on a local folder and on the S3 test
endpoint; holders are real processes (a live one holds, a killed one's lease is taken over)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import storage
from pipeline.train.lease import LEASE_FILE, Lease, LeaseHeld
from tests.conftest import sqlite_store

HOLD = """
import sys, time
from pipeline.train.lease import Lease
lease = Lease(sys.argv[1], ttl_s=float(sys.argv[2]), heartbeat_s=0.2)
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder(run_uri: str, ttl_s: float = 60.0) -> subprocess.Popen:
    """Another driver, in another process, holding the lease of `run_uri`."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run_uri, str(ttl_s)],
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": root})
    assert proc.stdout.readline().strip() == b"held"
    return proc


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "a")
    bucket = request.getfixturevalue("s3")
    return f"s3://{bucket}/runs/a"


def test_a_live_holder_keeps_the_run(run_uri):
    proc = holder(run_uri)
    try:
        with pytest.raises(LeaseHeld, match=rf"is being written by another run \(pid {proc.pid} "
                                            r"on .*; wait for it to end, stop it, or choose "
                                            r"another --name"):
            Lease(run_uri).acquire()
        # The heartbeat keeps it fresh past the second look.
        before = json.loads(storage.read_bytes(storage.join(run_uri, LEASE_FILE)))
        time.sleep(1.5)
        after = json.loads(storage.read_bytes(storage.join(run_uri, LEASE_FILE)))
        assert after["owner"] == before["owner"] and after["pid"] == proc.pid
        with pytest.raises(LeaseHeld):
            Lease(run_uri).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(run_uri):
    proc = holder(run_uri)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lease = Lease(run_uri)
    lease.acquire()                  # no waiting out the TTL: the process is gone
    doc = json.loads(storage.read_bytes(storage.join(run_uri, LEASE_FILE)))
    assert doc["owner"] == lease.owner and doc["pid"] == os.getpid()
    lease.release()
    assert not _exists(run_uri)


def test_an_expired_lease_of_another_host_is_taken_over(run_uri):
    uri = storage.join(run_uri, LEASE_FILE)
    storage.write_bytes(uri, json.dumps({"owner": "x", "host": "elsewhere", "pid": 1,
                                         "ttl_s": 3}).encode())
    # Fresh: within its TTL (S3's Last-Modified has whole seconds: ages read up to 1 s high).
    with pytest.raises(LeaseHeld):
        Lease(run_uri).acquire()
    time.sleep(3.5)
    lease = Lease(run_uri)
    lease.acquire()
    lease.release()


def test_release_keeps_a_lease_that_is_no_longer_ours(run_uri):
    lease = Lease(run_uri)
    lease.acquire()
    lease._stop.set()                # no more beats: simulate being overtaken
    uri = storage.join(run_uri, LEASE_FILE)
    storage.write_bytes(uri, json.dumps({"owner": "other", "host": "h", "pid": 1}).encode())
    lease.release()
    assert json.loads(storage.read_bytes(uri))["owner"] == "other"


def test_the_second_driver_waits_for_the_first_to_release(run_uri):
    first, second = Lease(run_uri), Lease(run_uri)
    first.acquire()
    try:
        with pytest.raises(LeaseHeld):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


def _exists(run_uri: str) -> bool:
    try:
        storage.read_bytes(storage.join(run_uri, LEASE_FILE))
        return True
    except storage.StorageError:
        return False


def test_a_run_folder_the_lease_made_goes_if_nothing_was_written(tmp_path):
    """A refused start (bad --resume, say) leaves no empty run folder behind."""
    lease = Lease(str(tmp_path / "runs" / "refused"))
    lease.acquire()
    lease.release()
    assert not (tmp_path / "runs" / "refused").exists()
    kept = Lease(str(tmp_path / "runs" / "trained"))
    kept.acquire()
    (tmp_path / "runs" / "trained" / "step_00000010").mkdir()
    kept.release()
    assert (tmp_path / "runs" / "trained" / "step_00000010").is_dir()


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 200, "a\\b"])
def test_run_names_stay_inside_the_storage(name):
    from pipeline.train.config import apply_overrides, smoke

    with pytest.raises(ValueError, match=r"run.name .*: use letters, digits"):
        apply_overrides(smoke(), [f"run.name={name}"])
    assert apply_overrides(smoke(), ["run.name=vit-b16_lr3e-4.v2"]).run.name == \
        "vit-b16_lr3e-4.v2"


@pytest.mark.slow
@pytest.mark.ray
def test_a_second_vit_pretrain_of_the_same_run_is_refused(tmp_path):
    """The real command, while another driver (a real process) holds the run."""
    storage = tmp_path / "runs"
    proc = holder(str(storage / "busy"))
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))))
        out = subprocess.run(
            [sys.executable, "-m", "jobs.pretrain", "--preset", "smoke", "--name", "busy",
             "--out", str(storage)], cwd=root, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": root, "MLFLOW_TRACKING_URI":
                 sqlite_store(tmp_path / "m.db"), "RAY_ADDRESS": ""})
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 2, out.stderr[-2000:]
    last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"error: run folder {storage / 'busy'} is being written by another "
                           f"run (pid {proc.pid} on ")
    assert not list((storage / "busy").glob("step_*"))
