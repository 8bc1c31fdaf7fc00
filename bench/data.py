"""Input pipeline throughput: Ray Data over WebDataset shards on local disk and on "remote"
S3, against a plain webdataset + torch DataLoader and against the raw decode+crop limit of
one core. With --plan: what building the stream of a long run costs the driver.

All decode the same real JPEGs from the same shards and make the same 224-px Inception-style
random-resized crops + flips (`pipeline.data.transforms`), as uint8 batches.

  raw        one process, samples already in memory: decode + crop in a tight loop
  dataloader webdataset.WebDataset(shards) -> DataLoader(num_workers=N), batches of B
  ray local  pipeline.data.stream.shard_dataset -> iter_torch_batches(B), ray.init(num_cpus=N)
  ray remote the same, the shards in an S3 bucket (moto's server) behind a proxy that adds
             cloud-like latency and a per-connection bandwidth cap (infra/s3_proxy.py)

Reported: images/s, images/s per core (N cores for the pipelines, 1 for raw), the ratios, and
the time from building the pipeline to its first batch. The S3 server and the proxy run on
the same cores here (on a cluster they are elsewhere): remote pays for them twice.

    python bench/data.py                 # 2 cores, 2000 images of 320 px (written once)
    python bench/data.py --cores 8 --images 8000 --latency-ms 30 --mbps 100
    python bench/data.py --plan          # 90 epochs x 5,000 shards: driver seconds to start
    python bench/data.py --augment medium1   # AugReg's RandAugment + Mixup: what they cost

With --augment LEVEL (one of pipeline.data.augreg.LEVELS): the device-side augmentation alone
(images/s on the training device: the GPU when there is one, else one CPU core), and Ray Data
from local files with and without the consumer applying it to every batch on that device, as
the training loop does. The read tasks do the same work either way; what AugReg costs is the
consumer's device time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data import shards
from pipeline.data.transforms import Augment, decode_and_augment

AUG = Augment("inception", 224)
EPOCHS = 2  # passes over the shards per pipeline measurement


def make_data(root: Path, images: int, size: int) -> dict:
    if (root / shards.MANIFEST).exists():
        return shards.read_manifest(str(root))
    src = shards.grating_images(num_samples=images, num_classes=10, image_size=size, val_fraction=0)
    return shards.write_shards(src, str(root), shards.ShardOptions(shard_size_mb=2),
                               log=lambda m: None)


def shard_paths(root: Path, manifest: dict) -> list[str]:
    return [str(root / s["name"]) for s in manifest["splits"]["train"]["shards"]]


def bench_raw(paths: list[str], limit: int) -> float:
    blobs = []
    for p in paths:
        with tarfile.open(p) as tar:
            blobs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    blobs = blobs[:limit]
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(3):  # median of 3 rounds: one core's rate is noisy on a shared machine
        start = time.perf_counter()
        for b in blobs:
            decode_and_augment(b, AUG, rng)
        rates.append(len(blobs) / (time.perf_counter() - start))
    return sorted(rates)[1]


def _wds_decode(sample):
    rng = np.random.default_rng()
    return decode_and_augment(sample["jpg"], AUG, rng), int(sample["cls"])


def bench_dataloader(paths: list[str], cores: int, batch: int) -> tuple[float, float, float]:
    """-> (images/s, seconds to the first batch, cores the consuming process used)."""
    import torch
    import webdataset as wds

    start = time.perf_counter()
    ds = wds.WebDataset(paths * EPOCHS, shardshuffle=False, nodesplitter=None,
                        workersplitter=wds.split_by_worker, empty_check=False).map(_wds_decode)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cores,
                                         prefetch_factor=4, persistent_workers=False)
    n, first, t_first = 0, None, 0.0
    for images, _ in loader:
        if first is None:
            first = time.perf_counter() - start
            t_first, cpu = time.perf_counter(), time.process_time()
        else:
            n += len(images)
    wall = time.perf_counter() - t_first
    return n / wall, first, (time.process_time() - cpu) / wall


def bench_ray(uri: str, cores: int, batch: int, during=None, consume=None
              ) -> tuple[float, float, float]:
    """-> (images/s, seconds to the first batch, cores the consuming process used).
    `during`: a context manager entered for the timed part (after the first batch);
    `consume`: a function the consumer applies to each batch (the trainer's device work)."""
    import ray

    from pipeline.data.stream import InputConfig, shard_dataset

    ray.init(address="local", num_cpus=cores, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        # Warm the workers once: process start-up and imports are a one-off per cluster, not
        # per epoch (DataLoader workers inherit the parent's imports through fork).
        def warm():
            import pipeline.data.stream  # noqa: F401
            time.sleep(0.5)  # keep this worker busy so that each task lands on its own

        ray.get([ray.remote(warm).remote() for _ in range(cores)])
        start = time.perf_counter()
        cfg = InputConfig(uri=uri, augment=AUG, block_rows=64)
        ds, _, _ = shard_dataset(cfg, num_epochs=EPOCHS)
        n = 0
        batches = ds.iter_torch_batches(batch_size=batch, prefetch_batches=4)
        first_batch = next(iter_batches := iter(batches))
        first = time.perf_counter() - start
        del first_batch
        with during or contextlib.nullcontext():
            t_first, cpu = time.perf_counter(), time.process_time()
            for b in iter_batches:
                n += len(b["image"])
                if consume is not None:
                    consume(b)
            wall = time.perf_counter() - t_first
        return n / wall, first, (time.process_time() - cpu) / wall
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError as err:
            if getattr(err, "code", None):      # an HTTP error status: it is up
                return
            if time.time() > deadline:
                raise
            time.sleep(0.2)


class RemoteS3:
    """moto's S3 server and the slow proxy in front of it, as subprocesses; the shards
    uploaded. Sets the AWS variables for this process and the Ray workers it starts."""

    def __init__(self, root: Path, latency_ms: float, mbps: float):
        self.root, self.latency_ms, self.mbps = root, latency_ms, mbps

    def __enter__(self) -> str:
        import boto3

        s3_port, proxy_port = free_port(), free_port()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        self.procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parents[1] / "infra/s3_proxy.py"),
             "--upstream", f"http://127.0.0.1:{s3_port}", "--port", str(proxy_port),
             "--latency-ms", str(self.latency_ms), "--mbps", str(self.mbps)],
            env=env, stdout=subprocess.DEVNULL))
        wait_for(f"http://127.0.0.1:{s3_port}")
        wait_for(f"http://127.0.0.1:{proxy_port}")
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                               "AWS_DEFAULT_REGION")})
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s3_port}"   # upload directly
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        for f in sorted(self.root.iterdir()):
            client.upload_file(str(f), "bench", f"data/{f.name}")
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy_port}"  # read slowly
        return "s3://bench/data"

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)
        os.environ.pop("AWS_ENDPOINT_URL", None)

    @contextlib.contextmanager
    def measured(self):
        """Cores the S3 server and the proxy use while the block runs -> `self.cores`."""
        def cpu() -> float:
            ticks = 0
            for p in self.procs:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])        # utime + stime
            return ticks / os.sysconf("SC_CLK_TCK")

        start, t0 = cpu(), time.perf_counter()
        yield self
        self.cores = (cpu() - start) / (time.perf_counter() - t0)


def throughput(args) -> None:
    root = Path(args.data) / f"{args.images}x{args.image_size}-2mb"
    manifest = make_data(root, args.images, args.image_size)
    paths = shard_paths(root, manifest)
    print(f"{args.images} JPEGs of {args.image_size}px in {len(paths)} shards; "
          f"{AUG.size}px inception crops + flip; batch {args.batch_size}; {args.cores} cores; "
          f"remote S3: {args.latency_ms:g} ms per request, {args.mbps:g} MB/s per connection")

    raw = bench_raw(paths, limit=min(args.images, 1000))
    dl, dl_first, dl_cpu = bench_dataloader(paths, args.cores, args.batch_size)
    local, local_first, local_cpu = bench_ray(str(root), args.cores, args.batch_size)
    server = RemoteS3(root, args.latency_ms, args.mbps)
    with server as uri:
        remote, remote_first, remote_cpu = bench_ray(uri, args.cores, args.batch_size,
                                                     during=server.measured())
    remote_cpu += server.cores      # on a cluster, the storage is not on the node

    c = args.cores
    rows = [("raw decode+crop (1 core)", raw, 1.0, None, None),
            (f"webdataset + DataLoader ({c} workers)", dl, c, dl_first, dl_cpu),
            (f"Ray Data, local files ({c} CPUs)", local, c, local_first, local_cpu),
            (f"Ray Data, remote S3 ({c} CPUs)", remote, c, remote_first, remote_cpu)]
    print(f"{'pipeline':<40}{'images/s':>10}{'per core':>10}{'first batch':>13}"
          f"{'consumer':>10}{'per core left':>15}")
    for name, total, cores, first, consumer in rows:
        first_s = f"{first:.2f} s" if first is not None else "-"
        cons = f"{consumer:.2f}" if consumer is not None else "-"
        left = f"{total / max(cores - consumer, 0.1):.1f}" if consumer is not None else "-"
        print(f"{name:<40}{total:>10.1f}{total / cores:>10.1f}{first_s:>13}{cons:>10}"
              f"{left:>15}")
    print("consumer: cores the process iterating the batches used (it shares the machine with "
          "the decoders here;\n  on a GPU node it is the trainer), for remote S3 plus the "
          f"cores its server and proxy used ({server.cores:.2f}).\n  per core left: images/s "
          "per core that these left to the pipeline.")
    left = remote / max(c - remote_cpu, 0.1) / (local / max(c - local_cpu, 0.1))
    print(f"remote / local:              {remote / local:.3f}   (goal >= 0.9); per core left "
          f"by consumer and storage: {left:.3f}")
    print(f"Ray local / raw per core:    {local / c / raw:.3f}   (goal >= 0.9); per core left "
          f"by the consumer: {local / max(c - local_cpu, 0.1) / raw:.3f}")
    print(f"Ray local / DataLoader:      {local / dl:.3f}")
    print(f"Ray time to first batch:     {local_first:.2f} s local, {remote_first:.2f} s remote")


def augment_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def augmenter(name: str, device):
    """The training loop's device work on a batch: upload, AugReg `name`, scale to [-1, 1]."""
    import torch

    from pipeline.data.augreg import level

    aug, step = level(name), iter(range(1 << 62))

    def apply(batch):
        images = batch["image"].to(device, non_blocking=True)
        x, _ = aug(images, batch["label"].to(device), 1000, aug.rng(0, 0, next(step), 0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x
    return apply


def bench_augment_alone(name: str, device, batch: int, rounds: int = 6) -> float:
    """images/s of AugReg `name` alone on uint8 224-px batches on `device` (on CPU with one
    thread, set by the caller: comparable with the raw decode of one core)."""
    import torch
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, AUG.size, AUG.size, 3), dtype=torch.uint8,
                           generator=g)
    apply = augmenter(name, device)
    fake = {"image": images, "label": torch.zeros(batch, dtype=torch.long)}
    apply(fake)                                      # warm-up (kernels, allocator)
    start = time.perf_counter()
    for _ in range(rounds):
        apply(fake)
    return rounds * batch / (time.perf_counter() - start)


def augment_cost(args) -> None:
    root = Path(args.data) / f"{args.images}x{args.image_size}-2mb"
    manifest = make_data(root, args.images, args.image_size)
    paths = shard_paths(root, manifest)
    device = augment_device()
    from pipeline.data.augreg import LEVELS

    layers, magnitude, p = LEVELS[args.augment]
    print(f"{args.images} JPEGs of {args.image_size}px; {AUG.size}px inception crops + flip; "
          f"batch {args.batch_size}; {args.cores} cores; AugReg {args.augment!r}: "
          f"RandAugment({layers}, {magnitude}), Mixup p={p:g}, on {device}")
    import torch

    torch.set_num_threads(1)    # the consumer: one thread, as a trainer feeding a GPU uses
    raw = bench_raw(paths, limit=min(args.images, 1000))
    alone = bench_augment_alone(args.augment, device, args.batch_size)
    plain, _, plain_cpu = bench_ray(str(root), args.cores, args.batch_size)
    augd, _, aug_cpu = bench_ray(str(root), args.cores, args.batch_size,
                                 consume=augmenter(args.augment, device))
    c = args.cores
    where = "1 GPU" if device.type == "cuda" else "1 core"
    print(f"{'':<46}{'images/s':>10}{'per core':>10}{'consumer':>10}{'per core left':>15}")
    print(f"{'raw decode+crop (1 core)':<46}{raw:>10.1f}{raw:>10.1f}{'-':>10}{'-':>15}")
    print(f"{f'AugReg {args.augment} alone ({where})':<46}{alone:>10.1f}{'-':>10}{'-':>10}"
          f"{'-':>15}")
    for label, rate, cons in ((f"Ray Data, local files ({c} CPUs)", plain, plain_cpu),
                              (f"  + AugReg on the consumer's {device.type}", augd, aug_cpu)):
        print(f"{label:<46}{rate:>10.1f}{rate / c:>10.1f}{cons:>10.2f}"
              f"{rate / max(c - cons, 0.1):>15.1f}")
    print(f"AugReg alone / raw decode per core:          {alone / raw:.2f}")
    print(f"with / without AugReg, per core left:        "
          f"{(augd / max(c - aug_cpu, 0.1)) / (plain / max(c - plain_cpu, 0.1)):.3f}"
          f"   (goal >= 0.9: the read tasks are not slowed)")
    print(f"with / without AugReg, images/s:             {augd / plain:.3f}"
          + ("" if device.type == "cuda" else "   (on CPU the consumer's augmentation "
             "takes cores the decoders would use)"))


def plan_cost(args) -> None:
    """Driver seconds from building the stream of `epochs` x `shards` reads to its first
    row: today's reader (bounded read tasks that compute the plan) against the stream as it
    was built before (the plan listed, one Ray Data block per read)."""
    import ray

    from pipeline.data.plan import DataPosition, StreamPlan
    from pipeline.data.stream import InputConfig, shard_dataset
    from pipeline.data.transforms import Augment

    root = Path(args.data) / "plan-shards"
    root.mkdir(parents=True, exist_ok=True)
    src = shards.grating_images(num_samples=10, num_classes=2, image_size=32, val_fraction=0)
    files = [str(root / f"s{i}.tar") for i in range(10)]
    for i, f in enumerate(files):
        if not Path(f).exists():
            with tarfile.open(f, "w") as tar:
                ref = src.splits["train"][i]
                for suffix, data in (("jpg", ref.load()[0]), ("cls", b"%d" % ref.label)):
                    info = tarfile.TarInfo(f"k{i}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    n, epochs = args.shards, args.epochs
    manifest = {"format": "webdataset", "num_classes": 2, "classes": ["a", "b"], "splits": {
        "train": {"num_samples": n, "shards": [{"name": files[i % 10], "samples": 1}
                                               for i in range(n)]}}}
    ray.init(address="local", num_cpus=args.cores, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ray.get([ray.remote(lambda: None).remote() for _ in range(args.cores)])  # warm
        start = time.perf_counter()
        ds, _, _ = shard_dataset(InputConfig(uri=str(root), augment=Augment("resize", 32)),
                                 epochs, manifest=manifest)
        next(iter(ds.iter_rows()))
        now = time.perf_counter() - start

        base_epochs = max(1, round(epochs * args.baseline_fraction))
        start = time.perf_counter()
        items = StreamPlan.from_manifest(manifest, "train", 0).reads(DataPosition(),
                                                                     base_epochs)
        listed = time.perf_counter() - start
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        next(iter(ds.map_batches(lambda b: b, batch_size=1).iter_rows()))
        before = time.perf_counter() - start
    finally:
        ray.shutdown()
    scale = epochs / base_epochs
    print(f"plan of {epochs} epochs x {n} shards = {epochs * n:,} reads, {args.cores} CPUs")
    print(f"{'stream':<52}{'driver s to first row':>22}")
    print(f"{'bounded read tasks, plan computed in them (now)':<52}{now:>22.2f}")
    what = f"plan listed, one block per read ({base_epochs} epochs"
    what += f", x{scale:g})" if scale != 1 else ")"
    print(f"{what:<52}{before * scale:>22.2f}")
    print(f"  of which listing the plan in Python: {listed * scale:.2f} s")
    print(f"now: {now:.2f} s (goal < 5 s); {before * scale / now:.0f}x less than before")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=30.0, help="remote S3, per request")
    ap.add_argument("--mbps", type=float, default=100.0, help="remote S3, MB/s per connection")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "vit-bench-data"))
    ap.add_argument("--plan", action="store_true", help="measure the cost of the plan instead")
    ap.add_argument("--epochs", type=int, default=90, help="--plan: epochs")
    ap.add_argument("--shards", type=int, default=5000, help="--plan: shards")
    ap.add_argument("--baseline-fraction", type=float, default=0.1,
                    help="--plan: build the old stream for this fraction of the epochs and "
                         "scale linearly (1: all of it, minutes)")
    ap.add_argument("--augment", metavar="LEVEL",
                    help="measure AugReg's device-side augmentation at this named level")
    args = ap.parse_args()
    if args.plan:
        plan_cost(args)
    elif args.augment:
        augment_cost(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
