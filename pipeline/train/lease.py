"""One writer per run: a lease file in the run's storage folder.

Two drivers writing the same run (`--name` and `--out` reused while the first still runs)
would interleave checkpoints, resume each other's half-written steps and log into the same
MLflow run. The driver takes `<storage>/<run name>/lease.json` before anything else and keeps
it fresh with a heartbeat; a second driver finds it held and stops with one line. A driver that
dies (SIGKILL, a lost head node) stops renewing: its lease expires after `ttl_s`, or at once
when the holder was a process of this host that no longer exists.

Taking the lease is atomic: an exclusive create (`O_EXCL` locally; S3's conditional PUT
`If-None-Match: *`), and replacing an expired one is conditional on what was read (S3
`If-Match: <ETag>`; locally a compare-and-replace under `flock`), so two drivers racing for it
cannot both win. AWS S3, MinIO and moto honour
both conditions.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import threading
import time
import uuid
from datetime import UTC, datetime

from pipeline import storage

log = logging.getLogger("pipeline.train")

LEASE_FILE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live driver writes this run."""


class Lease:
    def __init__(self, run_uri: str, ttl_s: float = 120.0, heartbeat_s: float = 20.0):
        self.uri = storage.join(run_uri, LEASE_FILE)
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.owner = uuid.uuid4().hex
        self.version: str | None = None          # what we last wrote (ETag or mtime_ns)
        # A local run folder this lease creates is removed on release if nothing else was
        # written into it (a refused start leaves no trace).
        run_dir = None if storage.is_s3(run_uri) else run_uri
        self._made_dir = run_dir if run_dir and not os.path.exists(run_dir) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record -------------------------------------------------------------------------
    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": platform.node(), "pid": os.getpid(),
                           "heartbeat": datetime.now(UTC).isoformat(timespec="seconds"),
                           "ttl_s": self.ttl_s}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the holder."""
        for _ in range(3):
            if _create(self.uri, self._record()):
                self.version = _read(self.uri)[1]
                self._start_heartbeat()
                return
            found = _read(self.uri)
            if found is None:
                continue                          # released between our two calls
            doc, version, age = found
            if not self._expired(doc, age):
                raise LeaseHeld(
                    f"run folder {self.uri.rsplit('/', 1)[0]} is being written by another run "
                    f"(pid {doc.get('pid')} on {doc.get('host')}, last heartbeat {age:.0f} s "
                    f"ago); wait for it to end, stop it, or choose another --name (a dead "
                    f"run's lease expires {doc.get('ttl_s', self.ttl_s):.0f} s after its last "
                    f"heartbeat)")
            log.warning("taking over the lease of run folder %s from pid %s on %s (last "
                        "heartbeat %.0f s ago: that run is gone)", self.uri.rsplit("/", 1)[0],
                        doc.get("pid"), doc.get("host"), age)
            if _replace(self.uri, self._record(), version):
                self.version = _read(self.uri)[1]
                self._start_heartbeat()
                return
        raise LeaseHeld(f"{self.uri}: another run took this run folder's lease at the same "
                        f"time; choose another --name or retry")

    def _expired(self, doc: dict, age: float) -> bool:
        if age > float(doc.get("ttl_s", self.ttl_s)):
            return True
        # A process of this host that is gone cannot renew: no need to wait out the TTL.
        return doc.get("host") == platform.node() and not process_alive(int(doc.get("pid", 0)))

    # -- heartbeat and release --------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if _replace(self.uri, self._record(), self.version):
                    self.version = _read(self.uri)[1]
                else:
                    log.error("the lease of %s was taken by another run; this run's "
                              "checkpoints may be overwritten", self.uri)
                    return
            except Exception as err:  # noqa: BLE001 - a missed beat is retried; TTL is long
                log.warning("could not renew the run lease %s: %s", self.uri,
                            str(err).splitlines()[0][:160] if str(err) else type(err).__name__)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        found = _read(self.uri)
        if found is not None and found[0].get("owner") == self.owner:
            _delete(self.uri)
        if self._made_dir:
            leftovers = set(os.listdir(self._made_dir)) - {".lease.lock"}
            if not leftovers:
                shutil.rmtree(self._made_dir, ignore_errors=True)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- storage primitives: atomic create, conditional replace -----------------------------------
def _create(uri: str, data: bytes) -> bool:
    """Create `uri` holding `data` unless it exists. -> whether we created it."""
    if storage.is_s3(uri):
        return _s3_put(uri, data, IfNoneMatch="*")
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    try:
        fd = os.open(uri, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _replace(uri: str, data: bytes, version: str | None) -> bool:
    """Overwrite `uri` if it is still at `version`. -> whether it was."""
    if storage.is_s3(uri):
        return _s3_put(uri, data, IfMatch=version)
    import fcntl

    with open(os.path.join(os.path.dirname(uri), ".lease.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # compare-and-replace, one process at a time
        found = _read(uri)
        if found is None or found[1] != version:
            return False
        tmp = f"{uri}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)
        return True


def _read(uri: str) -> tuple[dict, str, float] | None:
    """-> (record, version, seconds since it was written), or None if there is none."""
    if storage.is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(uri)
        try:
            got = storage.s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise storage.StorageError(f"{uri}: cannot read the run lease "
                                       f"({err.response.get('Error', {}).get('Code')})") from None
        body, version = got["Body"].read(), got["ETag"]
        age = time.time() - got["LastModified"].timestamp()
    else:
        try:
            st = os.stat(uri)
            with open(uri, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        version, age = str(st.st_mtime_ns), time.time() - st.st_mtime
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}                                  # unreadable: treated as expired by age
    return (doc if isinstance(doc, dict) else {}), version, max(age, 0.0)


def _s3_put(uri: str, data: bytes, **condition) -> bool:
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    try:
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        raise storage.StorageError(f"{uri}: cannot write the run lease ({code})") from None
    return True


def _delete(uri: str) -> None:
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        storage.s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        try:
            os.unlink(uri)
        except FileNotFoundError:
            pass
