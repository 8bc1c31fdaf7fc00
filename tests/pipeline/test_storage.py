"""A missing file or object is `storage.NotFound`, on local disk and on S3 (moto over HTTP),
whichever way it is reached; other failures are not, so nobody mistakes an unreachable
endpoint for a missing shard."""

from __future__ import annotations

import pytest

from pipeline import storage
from tests.conftest import free_port


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path) -> str:
    """A folder on local disk, or a prefix in a fresh bucket of the test S3 endpoint."""
    if request.param == "local":
        return str(tmp_path)
    return f"s3://{request.getfixturevalue('s3')}/data"


def test_a_missing_file_or_object_is_not_found(root):
    missing = storage.join(root, "shard-000007.tar")
    with pytest.raises(storage.NotFound, match="shard-000007.tar: no such"):
        storage.read_bytes(missing)
    fs, path = storage.filesystem(missing)
    with pytest.raises(storage.NotFound, match="shard-000007.tar: no such file or object"):
        storage.open_read(fs, path)
    with storage.ReadAhead(fs, path) as stream, pytest.raises(storage.NotFound):
        stream.wait_open()
    with pytest.raises(storage.NotFound):
        storage.delete(missing)
    storage.delete(missing, missing_ok=True)
    # Still what callers that know the builtin or our base class catch.
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing)
    with pytest.raises(storage.StorageError):
        storage.read_bytes(missing)


def test_a_present_file_or_object_reads_and_deletes(root):
    there = storage.join(root, "a.txt")
    storage.write_bytes(there, b"abc")
    fs, path = storage.filesystem(there)
    with storage.ReadAhead(fs, path) as stream:
        assert stream.wait_open().read() == b"abc"
    with storage.open_read(fs, path) as stream:
        assert stream.read() == b"abc"
    storage.delete(there)
    with pytest.raises(storage.NotFound):
        storage.read_bytes(there)


@pytest.mark.s3
def test_an_unreachable_endpoint_is_not_a_missing_object(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    uri = "s3://bucket/data/shard-000007.tar"
    with pytest.raises(storage.StorageError, match="cannot reach") as err:
        storage.read_bytes(uri)
    assert not isinstance(err.value, storage.NotFound)
    fs, path = storage.filesystem(uri)

    def read_ahead():
        with storage.ReadAhead(fs, path) as stream:
            stream.wait_open()

    for attempt in (lambda: storage.open_read(fs, path), read_ahead,
                    lambda: storage.delete(uri, missing_ok=True)):
        with pytest.raises(OSError) as err:
            attempt()
        assert not isinstance(err.value, storage.NotFound), err.value
