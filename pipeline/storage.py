"""Object storage: one place that turns a URI (`s3://bucket/key`, a local path) into I/O.

S3 goes through boto3, which honours the standard AWS settings: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for MinIO / moto / any S3 endpoint, the credential chain, and
`AWS_REGION` / `AWS_DEFAULT_REGION`. Credentials are never logged or returned.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path


class StorageError(RuntimeError):
    """A storage problem with a one-line explanation and the fix."""


class NotFound(StorageError, FileNotFoundError):
    """No file or object at the path, on local disk or S3: a missing shard, manifest or
    snapshot. Callers tell it from other storage failures by type, never by message text (an
    S3 endpoint words its errors as it likes). A FileNotFoundError too, so code that catches
    the builtin, as for a local file, catches it on S3 as well."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


# What the presets and infra/ files hold until a user fills in their own bucket or image.
PLACEHOLDERS = ("CHANGE-ME", "your-bucket", "your-org")


def check_filled_in(value: str | os.PathLike | None, what: str) -> None:
    """Refuse a location that still holds a placeholder of the presets or the cluster files
    (`s3://CHANGE-ME/...`, `s3://your-bucket/...`), before anything starts: otherwise it
    surfaces minutes later, on a cluster, as a bucket that does not exist."""
    text = os.fspath(value) if value is not None else ""
    for mark in PLACEHOLDERS:
        if mark in text:
            raise ValueError(f"{what} is still the placeholder {text!r}: replace "
                             f"'{mark}' with your own bucket")


def unwritable(dst: str | os.PathLike, what: str = "the destination") -> str | None:
    """Why a command cannot write into the local folder `dst` (created if missing), as one
    line naming the fix, or None: it is a file, lies under a file, or its nearest existing
    folder cannot be written. Nothing is created."""
    path = Path(dst).expanduser()
    if path.exists() and not path.is_dir():
        return (f"{dst}: {what} is a file; give a folder (created if missing) or "
                f"s3://bucket/prefix")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return (f"{dst}: cannot create {what}, {existing} is a file; give a folder (created "
                f"if missing) or s3://bucket/prefix")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{dst}: {existing} is not writable; choose another {what.removeprefix('the ')}"
    return None


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI; write s3://BUCKET/PREFIX")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


# Retries. `AWS_MAX_ATTEMPTS` (the standard AWS variable) counts attempts per request, for boto3
# and pyarrow alike; 12 by default, where the SDKs default to 3, so that a storage outage of
# up to ~50 s (a restarted endpoint, a network blip, a burst of 503s) costs a pause, not the
# run. pyarrow waits 0, 50, 100, ... ms before its retries (no jitter): 25 * (2**(n-1) - 2)
# ms in all for n attempts, 51 s for 12 (measured against a closed port: 51.2 s; 10 give
# 25.5 s). boto3's adaptive mode waits a jittered 50 ms * 2**i, capped at 20 s, plus its
# rate limiter (measured: 24-33 s for 10 attempts). A start-up check uses few attempts
# (`START_ATTEMPTS`): an endpoint that is wrong from the start should fail in seconds.
DEFAULT_ATTEMPTS = 12
START_ATTEMPTS = 3


def max_attempts() -> int:
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    try:
        return max(1, int(value)) if value else DEFAULT_ATTEMPTS
    except ValueError:
        raise StorageError(f"AWS_MAX_ATTEMPTS={value!r} is not a number; set a count of "
                           f"attempts such as {DEFAULT_ATTEMPTS}") from None


def s3_client(attempts: int | None = None):
    """A boto3 S3 client with retries (adaptive mode backs off on throttling and transient
    errors; `attempts` per request, `AWS_MAX_ATTEMPTS` by default)."""
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(retries={"max_attempts": attempts or max_attempts(), "mode": "adaptive"},
                    connect_timeout=10, read_timeout=60)
    # A fresh session each time: the default one caches credentials and settings.
    return boto3.session.Session().client("s3", region_name=region, config=config)


def _explain(uri: str, err: Exception) -> StorageError:
    """Map boto errors to one clear line naming the problem and the fix (never credentials)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(err, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or a profile / instance role)")
    if isinstance(err, EndpointConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint or '(AWS default)'}; "
                            f"check AWS_ENDPOINT_URL and that the service is up")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket does not exist; create it or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{uri}: no such object; check the path")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied ({code}); check the credentials and "
                                f"the bucket policy")
        return StorageError(f"{uri}: S3 error {code}")
    return StorageError(f"{uri}: {type(err).__name__}: {err}")


def list_objects(uri: str) -> list[str]:
    """Keys (relative to the prefix) of every object under an s3:// prefix."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client()
    keys = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
            keys += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
    except Exception as err:  # noqa: BLE001 - turned into one clear line
        raise _explain(uri, err) from None
    return keys


def fetch(uri: str, dest: str | os.PathLike) -> Path:
    """Make `uri` available locally. A local path is returned as is; an s3:// prefix with
    objects under it is downloaded as a directory, otherwise the object itself as a file."""
    if not is_s3(uri):
        return Path(uri)
    bucket, key = split_s3(uri)
    client = s3_client()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = key.rstrip("/").rsplit("/", 1)[-1] or bucket
    # A "directory" first: writers such as pyarrow leave empty marker objects named like it.
    rels = [r for r in list_objects(uri) if r and not r.endswith("/")]
    try:
        if rels:
            root = dest / name
            for rel in rels:
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key.rstrip("/") + "/" + rel, str(target))
            return root
        target = dest / name
        client.download_file(bucket, key, str(target))
        return target
    except Exception as err:  # noqa: BLE001
        raise _explain(uri, err) from None


def upload_dir(local: str | os.PathLike, uri: str, last: tuple[str, ...] = ()) -> None:
    """Upload every file under `local` to the s3:// prefix `uri`; files named in `last` go
    last, so a reader that waits for them never sees a half-written directory."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    try:
        for path in files:
            key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local).as_posix()]))
            client.upload_file(str(path), bucket, key)
    except Exception as err:  # noqa: BLE001
        raise _explain(uri, err) from None


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Settings:
    """What a pyarrow S3 filesystem is built from. No credentials: each process resolves its
    own (see `s3_filesystem`)."""

    region: str
    endpoint: str | None
    attempts: int
    connect_timeout: float = 10
    request_timeout: float = 60

    @classmethod
    def from_env(cls) -> S3Settings:
        region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or "us-east-1")
        return cls(region, _endpoint(), max_attempts())


def s3_filesystem(settings: S3Settings | None = None):
    """A pyarrow S3 filesystem built from the standard AWS settings (`S3Settings.from_env`),
    resolving credentials itself, in whichever process uses it, and retrying there.

    The bare `pyarrow.fs.S3FileSystem()` ignores `AWS_ENDPOINT_URL` (apache/arrow#49643), so
    the endpoint and region are passed explicitly. Credentials are not: the AWS SDK's default
    chain (environment, profile, `credential_process`, web identity, instance role) resolves
    them where the filesystem is used, and refreshes temporary ones before they expire. The
    object pickles without any secret, so the copies Ray ships to read tasks, Train workers
    and the Train controller resolve their own (set the AWS variables on every node, or use
    instance roles / IRSA).

    Hazards of pyarrow's own S3 filesystem that this one avoids:
    - its pickle drops the retry strategy: Ray's copies (checkpoint bookkeeping in the Train
      controller, read tasks) fell back to pyarrow's default of 3 attempts, so a few seconds
      of outage failed the run. This class pickles as its `S3Settings` and is rebuilt through
      this function, with the same retries in every process.
    - `AwsStandardS3RetryStrategy` has the AWS SDK's retry quota (500 tokens, 5 per retry),
      which Arrow never refills (its wrapper does not forward the SDK's bookkeeping of
      successes): after ~100 retries in its lifetime a filesystem retries nothing more
      (measured: 99 of 160 failing calls retried). A week-long run would lose its retries to
      ordinary 503s. `AwsDefaultS3RetryStrategy` has no quota; its backoff is above.
    - Python objects pyarrow re-wraps from C++ (`SubTreeFileSystem.base_fs`) are plain
      `S3FileSystem`s again: pass this object itself to Ray, never a wrapper's `base_fs`.
    """
    return _s3_class()(settings or S3Settings.from_env())


@functools.cache
def _s3_class():
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __init__(self, settings: S3Settings):
            self.settings = settings
            kwargs = dict(region=settings.region, connect_timeout=settings.connect_timeout,
                          request_timeout=settings.request_timeout,
                          # pyarrow's max_attempts here counts retries, not attempts.
                          retry_strategy=pafs.AwsDefaultS3RetryStrategy(
                              max_attempts=settings.attempts - 1))
            if settings.endpoint:
                kwargs["endpoint_override"] = settings.endpoint
            super().__init__(**kwargs)

        def __reduce__(self):
            return s3_filesystem, (self.settings,)

    return RetryingS3FileSystem


# Sequential reads of whole objects (tar shards) go through a buffer this large: pyarrow's S3
# stream is unbuffered and `tarfile` reads 10 KiB records, which cost one GET request each
# (200 GETs for a 2 MB shard); with the buffer a shard costs ceil(size / 32 MiB) GETs.
READ_BUFFER_BYTES = 32 << 20


def open_read(fs, path: str):
    """A buffered sequential reader over a whole file or object of `fs`; `NotFound` when there
    is none."""
    try:
        return fs.open_input_stream(path, buffer_size=READ_BUFFER_BYTES)
    except FileNotFoundError as err:
        raise _not_found(path, err) from None


def _not_found(path: str, err: FileNotFoundError) -> NotFound:
    """pyarrow's missing file or object (a FileNotFoundError on local disk and on S3, where
    HeadObject answered 404) as our type, its first line kept."""
    return NotFound(f"{path}: no such file or object ({str(err).splitlines()[0][:160]})")


def delete(uri: str, missing_ok: bool = False) -> None:
    """Delete one file or object; `NotFound` when it is not there, unless `missing_ok`."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError as err:
        if not missing_ok:
            raise _not_found(uri, err) from None


class ReadAhead:
    """A sequential reader of a whole file or object that fetches its next chunk
    (`READ_BUFFER_BYTES`, one ranged GET on S3) in a background thread while the caller
    decodes the current one: per-request latency and transfer time hide behind the work,
    where a plain buffered stream makes the caller wait for each chunk. The object is opened
    in the thread too, so a reader can be started for the next shard before it is needed;
    `wait_open()` raises what opening raised (`NotFound` for a missing file or object).
    Memory: at most three chunks (one read, one queued, one being fetched)."""

    def __init__(self, fs, path: str, chunk: int = READ_BUFFER_BYTES):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._opened, self._stop = threading.Event(), threading.Event()
        self._open_error: BaseException | None = None
        self._buf, self._pos, self._eof = b"", 0, False
        self._thread = threading.Thread(target=self._fetch, args=(fs, path, chunk),
                                        daemon=True, name=f"read-ahead {path[-60:]}")
        self._thread.start()

    def _fetch(self, fs, path: str, chunk: int) -> None:
        try:
            f = fs.open_input_stream(path)
        except BaseException as err:  # noqa: BLE001 - handed to the reader's thread
            self._open_error = _not_found(path, err) if isinstance(err, FileNotFoundError) \
                else err
            self._opened.set()
            return
        self._opened.set()
        try:
            with f:
                while not self._stop.is_set():
                    data = f.read(chunk)
                    self._put(data)
                    if not data:
                        return
        except BaseException as err:  # noqa: BLE001 - raised where the data is read
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def wait_open(self) -> ReadAhead:
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error
        return self

    def read(self, n: int = -1) -> bytes:
        self.wait_open()
        parts, want = [], n if n >= 0 else float("inf")
        while want > 0:
            if self._pos >= len(self._buf):
                if self._eof:
                    break
                item = self._queue.get()
                if isinstance(item, BaseException):
                    self._eof = True
                    raise item
                if not item:
                    self._eof = True
                    break
                self._buf, self._pos = item, 0
            take = self._buf[self._pos:self._pos + min(want, len(self._buf) - self._pos)]
            self._pos += len(take)
            want -= len(take)
            parts.append(take)
        return b"".join(parts)

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():    # unblock the fetcher
            self._queue.get_nowait()
        self._thread.join(timeout=5)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def filesystem(uri: str):
    """-> (pyarrow filesystem, path inside it) for an s3:// URI or a local path."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def read_bytes(uri: str) -> bytes:
    """The whole object / file at `uri`, with one clear error when it is not there."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise NotFound(f"{uri}: no such file; check the path")
        return path.read_bytes()
    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:  # noqa: BLE001
        raise _explain(uri, err) from None


def write_bytes(uri: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Write a whole object atomically: an S3 PUT is all-or-nothing; a local file is written
    beside its target and renamed into place."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})
        except Exception as err:  # noqa: BLE001
            raise _explain(uri, err) from None
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def upload_file(local: str | os.PathLike, uri: str, metadata: dict[str, str] | None = None,
                callback=None) -> None:
    """Upload one file (multipart for large ones: the object appears only when complete)."""
    bucket, key = split_s3(uri)
    try:
        s3_client().upload_file(str(local), bucket, key, Callback=callback,
                                ExtraArgs={"Metadata": metadata or {}})
    except Exception as err:  # noqa: BLE001
        raise _explain(uri, err) from None


def object_metadata(uri: str) -> dict[str, str] | None:
    """User metadata of an s3:// object, or None when it does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key).get("Metadata", {})
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _explain(uri, err) from None
    except Exception as err:  # noqa: BLE001
        raise _explain(uri, err) from None


def check_bucket(uri: str) -> None:
    """Fail early, with one clear line, when the bucket of an s3:// URI is unusable."""
    bucket, _ = split_s3(uri)
    try:
        s3_client(START_ATTEMPTS).head_bucket(Bucket=bucket)
    except Exception as err:  # noqa: BLE001
        from botocore.exceptions import ClientError

        if isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in (
                "404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist; create it or fix "
                               f"the URI") from None
        raise _explain(uri, err) from None
