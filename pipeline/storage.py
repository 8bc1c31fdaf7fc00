"""Object storage: one place that turns a URI (`s3://bucket/key`, a local path) into I/O.

S3 goes through boto3, which honours the standard AWS settings: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for MinIO / moto / any S3 endpoint, the credential chain, and
`AWS_REGION` / `AWS_DEFAULT_REGION`. Credentials are never logged or returned.
"""

from __future__ import annotations

import os
from pathlib import Path


class StorageError(RuntimeError):
    """A storage problem with a one-line explanation and the fix."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


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


def s3_client():
    """A boto3 S3 client with retries (adaptive mode backs off on throttling)."""
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(retries={"max_attempts": 10, "mode": "adaptive"},
                    connect_timeout=10, read_timeout=60)
    return boto3.client("s3", region_name=region, config=config)


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
            return StorageError(f"{uri}: no such object; check the path")
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
    """Make `uri` available locally. A local path is returned as is; an s3:// object is
    downloaded into `dest`, and an s3:// prefix is downloaded as a directory."""
    if not is_s3(uri):
        return Path(uri)
    bucket, key = split_s3(uri)
    client = s3_client()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = key.rstrip("/").rsplit("/", 1)[-1] or bucket
    try:
        client.head_object(Bucket=bucket, Key=key)
        is_object = True
    except Exception as err:  # noqa: BLE001
        from botocore.exceptions import ClientError

        if not (isinstance(err, ClientError)
                and err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")):
            raise _explain(uri, err) from None
        is_object = False
    try:
        if is_object:
            target = dest / name
            client.download_file(bucket, key, str(target))
            return target
        keys = list_objects(uri)
        if not keys:
            raise StorageError(f"{uri}: nothing found at this path; check the URI")
        root = dest / name
        for rel in keys:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key.rstrip("/") + "/" + rel, str(target))
        return root
    except StorageError:
        raise
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
