"""How long a checkpoint blocks the training loop: synchronous against asynchronous saving.

A Ray Train worker builds the model with its AdamW state (one optimizer step, so the moments
exist), then saves `--checkpoints` checkpoints through `pipeline.train.checkpoints.
CheckpointWriter` into storage on an S3 endpoint (a moto server on 127.0.0.1 started here),
with `--gap` seconds of "training" (the loop sleeping) between them, once with
`checkpoint.asynchronous=false` and once with `true`, in the same run. Printed: the seconds
each save blocked the loop, and the seconds until the last checkpoint was complete in
storage.

    python bench/checkpoint.py                      # B/16 (86M parameters, 1.4 GB per checkpoint)
    python bench/checkpoint.py --variant Ti/16      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def worker(config: dict) -> None:
    """Ray Train worker: build, one step, then timed saves."""
    import torch

    from pipeline.model import ViT
    from pipeline.train import checkpoints
    from pipeline.train.config import PretrainConfig
    from pipeline.train.step import Pretrainer, decay_names, make_optimizer, train_step

    cfg = PretrainConfig.from_dict(config["cfg"])
    torch.manual_seed(0)
    model = Pretrainer(ViT(cfg.model), "softmax")
    opt = make_optimizer(model, decay_names(model), cfg, torch.device("cpu"))
    x = torch.rand(2, 3, cfg.model.image_size, cfg.model.image_size) * 2 - 1
    train_step(model, opt, [(x, torch.tensor([0, 1]))], 1e-4, 1.0, None)
    writer = checkpoints.CheckpointWriter(0, cfg.checkpoint.asynchronous)
    blocked = []
    for i in range(config["checkpoints"]):
        time.sleep(config["gap"])                      # the training between checkpoints
        doc = checkpoints.new_state(step=i + 1, samples_seen=0, data_position=None,
                                    config=cfg.to_dict(), run_name=cfg.run.name, run_id=None,
                                    world_size=1, strategy="ddp")
        t0 = time.perf_counter()
        writer.save(model, opt, cfg.model, doc, {})
        blocked.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    writer.close()
    Path(config["out"]).write_text(json.dumps({"blocked": blocked,
                                               "close": time.perf_counter() - t0}))


def measure(args, s3_root: str, asynchronous: bool) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import storage
    from pipeline.train import checkpoints
    from pipeline.train.config import apply_overrides, smoke
    from pipeline.weights import integrity

    name = f"ckpt-{'async' if asynchronous else 'sync'}"
    cfg = apply_overrides(smoke(), [f"model.variant={args.variant}", "model.image_size=224",
                                    "model.num_classes=1000", f"run.name={name}",
                                    f"checkpoint.asynchronous={asynchronous}"])
    out = Path(tempfile.mkdtemp()) / "times.json"
    fs, path = storage.filesystem(s3_root)
    t0 = time.perf_counter()
    TorchTrainer(worker, train_loop_config={"cfg": cfg.to_dict(), "checkpoints":
                                            args.checkpoints, "gap": args.gap, "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(
                     name=name, storage_path=path, storage_filesystem=fs,
                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))).fit()
    total = time.perf_counter() - t0
    times = json.loads(out.read_text())
    run_uri = storage.join(s3_root, name)
    last = checkpoints.latest(run_uri)
    assert last and last.endswith(checkpoints.dir_name(args.checkpoints)), last
    size = sum(integrity.listing(last).values())
    return {**times, "total": total, "bytes": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--gap", type=float, default=20.0,
                    help="seconds of training between checkpoints (default 20)")
    args = ap.parse_args()

    import logging
    import socket

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # one line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="bench")
    root = str(Path(__file__).resolve().parents[1])
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, **{k: os.environ[k] for k in (
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION")}}})
    try:
        results = {mode: measure(args, "s3://bench/runs", mode == "async")
                   for mode in ("sync", "async")}
    finally:
        ray.shutdown()
        server.stop()

    size = results["sync"]["bytes"] / 1e9
    print(f"\nViT-{args.variant} + AdamW state, {size:.2f} GB per checkpoint, 1 worker, CPU; "
          f"storage: S3 endpoint (moto) on 127.0.0.1; {args.checkpoints} checkpoints "
          f"{args.gap:.0f} s apart")
    print(f"{'mode':<8}{'blocked per checkpoint (s)':>30}{'median':>10}{'until stored':>15}")
    for mode, r in results.items():
        each = " ".join(f"{b:6.2f}" for b in r["blocked"])
        print(f"{mode:<8}{each:>30}{statistics.median(r['blocked']):>10.2f}"
              f"{r['close']:>14.2f}s")
    ratio = statistics.median(results["sync"]["blocked"]) / max(
        statistics.median(results["async"]["blocked"]), 1e-9)
    print(f"sync / async blocked time: {ratio:.1f}x (goal >= 5x)")
    print("'until stored': after the last save, how long the worker then waited for its "
          "background write (async)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
