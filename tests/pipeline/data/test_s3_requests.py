"""What reading costs on object storage: the S3 test endpoint logs every request it serves,
and each path that reads shards (the training stream in Ray Data tasks, the few-shot probe,
VTAB shards) must read a shard with at most ceil(size / buffer) + 1 GET requests, not one per
tar record. And no secret travels with the filesystem objects Ray pickles into tasks,
workers and run configs: every process resolves its own credentials."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

import pytest

from pipeline import storage
from pipeline.data import shards
from pipeline.data.plan import DataPosition, StreamPlan
from pipeline.data.probe import load_probe
from pipeline.data.stream import InputConfig, Reads, ShardReader, shard_dataset
from pipeline.data.transforms import Augment

pytestmark = [pytest.mark.s3]


class Requests(logging.Handler):
    """Counts the requests the moto endpoint (in this process) logs: {(method, key): n}."""

    PATTERN = re.compile(r'"(GET|HEAD|PUT|POST) /([^ ?]+)')

    def __init__(self, bucket: str):
        super().__init__()
        self.bucket, self.counts = bucket, Counter()

    def emit(self, record):
        # werkzeug colours some status lines: drop the terminal escapes first.
        m = self.PATTERN.search(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))
        if m and m.group(2).startswith(self.bucket + "/"):
            self.counts[(m.group(1), m.group(2)[len(self.bucket) + 1:])] += 1

    def __enter__(self):
        logger = logging.getLogger("werkzeug")
        self.saved_level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("werkzeug")
        logger.removeHandler(self)
        logger.setLevel(self.saved_level)

    def gets(self, prefix: str) -> dict[str, int]:
        return {k: n for (method, k), n in self.counts.items()
                if method == "GET" and k.startswith(prefix) and k.endswith(".tar")}


def _shards_of(manifest: dict, split: str) -> dict[str, int]:
    return {s["name"]: s["bytes"] for s in manifest["splits"][split]["shards"]}


def _bound(size: int) -> int:
    return math.ceil(size / storage.READ_BUFFER_BYTES) + 1


@pytest.mark.ray
@pytest.mark.slow
def test_training_stream_and_probe_read_each_shard_in_few_gets(ray_local, s3):
    data = f"s3://{s3}/data"
    manifest = shards.write_shards(
        shards.grating_images(num_samples=240, num_classes=4, image_size=96, val_fraction=0.25),
        data, shards.ShardOptions(shard_size_mb=0.4), log=lambda m: None)
    train = _shards_of(manifest, "train")
    assert len(train) >= 3 and min(train.values()) > 200_000, train   # >20 tar records each
    with Requests(s3) as requests:
        ds, _, _ = shard_dataset(InputConfig(uri=data, augment=Augment(
            "resize", 32)), num_epochs=2)
        assert ds.count() == 2 * manifest["splits"]["train"]["num_samples"]
    gets = requests.gets("data/")
    for name, size in train.items():
        # Two epochs: each shard is read twice.
        assert gets.get(f"data/{name}", 0) <= 2 * _bound(size), (name, size, gets)
        assert gets.get(f"data/{name}", 0) >= 2, f"{name} was read from the endpoint"

    with Requests(s3) as requests:
        probe = load_probe(data, "val", 32, max_images=1000)
    assert len(probe["labels"]) == manifest["splits"]["val"]["num_samples"]
    for name, size in _shards_of(manifest, "val").items():
        assert 1 <= requests.gets("data/").get(f"data/{name}", 0) <= _bound(size)


def test_vtab_shards_read_in_few_gets(s3, tmp_path):
    from eval.data import read_encoded, write_grating_task
    from eval.tasks import BY_NAME
    from jobs.make_shards import main as make_shards

    task = BY_NAME["eurosat"]
    folder = write_grating_task(tmp_path / "vtab", task, train=120, val=20, test=40,
                                image_size=96)
    assert make_shards(["vtab", "--data", str(folder),
                        "--out", f"s3://{s3}/vtab/eurosat", "--num-classes",
                        "10"]) == 0
    manifest = shards.read_manifest(f"s3://{s3}/vtab/eurosat")
    with Requests(s3) as requests:
        assert len(read_encoded(f"s3://{s3}/vtab", task, "train800").labels) == 120
    sizes = _shards_of(manifest, "train800")
    gets = requests.gets("vtab/eurosat/")
    assert sum(sizes.values()) > 200_000
    for name, size in sizes.items():
        assert 1 <= gets.get(f"vtab/eurosat/{name}", 0) <= _bound(size), gets


def test_no_secret_in_what_ray_pickles(s3, tmp_path):
    """The filesystem objects shipped to read tasks, Train workers and Ray Train's run config
    carry the endpoint and region, never the secret key: each process resolves credentials
    from its own AWS chain (so temporary ones refresh where they are used)."""
    import cloudpickle

    from pipeline.train.config import apply_overrides, smoke
    from pipeline.train.run import TrainData, ray_storage
    from pipeline.train.spec import WorkerSpec

    fs = storage.s3_filesystem()
    reads = Reads(StreamPlan((1,)), ("a.tar",), DataPosition(), 1, 1)
    reader = ShardReader(fs, f"{s3}/data", InputConfig(), 10, reads)
    path, run_fs = ray_storage(f"s3://{s3}/runs")
    cfg = apply_overrides(smoke(), [f"run.storage=s3://{s3}/runs"])
    spec = WorkerSpec(cfg=cfg, run_uri=f"s3://{s3}/runs/smoke")
    data = TrainData(cfg, f"s3://{s3}/runs/smoke", None, None, None, "health")
    for thing in (fs, reader, run_fs, spec, data):
        blob = cloudpickle.dumps(thing)
        assert b"testing-secret" not in blob, type(thing).__name__
    # ... and the unpickled filesystem still reads, with credentials it resolves itself.
    storage.write_bytes(f"s3://{s3}/probe.txt", b"hello")
    copy = cloudpickle.loads(cloudpickle.dumps(fs))
    with copy.open_input_stream(f"{s3}/probe.txt") as f:
        assert f.read() == b"hello"


def test_stream_through_a_slow_endpoint_reads_ahead(s3, s3_server, monkeypatch):
    """The S3 endpoint behind infra/s3_proxy.py (50 ms per request, 20 MB/s per connection),
    as the read tasks would meet a cloud region: every sample arrives once, each shard costs
    at most ceil(size / buffer) + 1 GETs, and signed requests pass the proxy unchanged."""
    from infra.s3_proxy import SlowS3Proxy

    data = f"s3://{s3}/slow"
    manifest = shards.write_shards(
        shards.grating_images(num_samples=120, num_classes=4, image_size=64, val_fraction=0),
        data, shards.ShardOptions(shard_size_mb=0.2), log=lambda m: None)
    with SlowS3Proxy(s3_server, latency_s=0.05, mbps=20) as proxy:
        # The read task's UDF, run in this process (Ray's workers were started with the
        # direct endpoint in their environment).
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fs, root = storage.filesystem(data)
        plan = StreamPlan.from_manifest(manifest, "train", 0)
        names = tuple(s["name"] for s in manifest["splits"]["train"]["shards"])
        reads = Reads(plan, names, DataPosition(), stop=2 * len(names), slots=1)
        reader = ShardReader(fs, root, InputConfig(
            augment=Augment("resize", 16)), 4, reads)
        rows = [(e, s, i) for b in reader({"id": [0]}) for e, s, i in zip(
            b["epoch"].tolist(), b["shard"].tolist(), b["index"].tolist(), strict=True)]
    assert len(rows) == len(set(rows)) == 2 * manifest["splits"]["train"]["num_samples"]
    for name, size in _shards_of(manifest, "train").items():
        gets = proxy.requests[("GET", f"/{s3}/slow/{name}")]
        assert 2 <= gets <= 2 * _bound(size), (name, gets)
    assert proxy.sent_bytes >= 2 * sum(_shards_of(manifest, "train").values())
