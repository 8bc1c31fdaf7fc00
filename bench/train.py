"""Training-loop overhead: the Ray Train loop (`pipeline.train.loop.train_loop`, 1 worker)
against the same `train_step` in a plain single-process loop: same model, same data (one
materialised synthetic dataset), same batch, same threads. Steady-state images/s (the first
log interval, with start-up and warm-up, is left out) and the ratio.

    python bench/train.py                                   # CPU: Ti/16 at 112 px, fp32
    python bench/train.py --variant B/16 --image-size 224 --batch-size 256 --gpu   # + MFU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from pipeline.data.transforms import to_model_input
from pipeline.model import ViT
from pipeline.perf import peak_flops, train_flops_per_image
from pipeline.schedule import learning_rate
from pipeline.train.config import apply_overrides, smoke
from pipeline.train.step import Pretrainer, decay_names, make_optimizer, train_step


def config(args, tmp):
    return apply_overrides(smoke(), [
        f"model.variant={args.variant}", f"model.image_size={args.image_size}",
        "model.num_classes=1000", "model.representation_size=none",
        f"train.global_batch_size={args.batch_size}", f"train.total_steps={args.steps}",
        f"train.log_every={args.log_every}", f"checkpoint.every={args.steps}",
        "probe.every=0", "optim.warmup_steps=5", f"scale.use_gpu={args.gpu}",
        f"scale.cpus_per_worker={args.cpus}", "scale.gpus_per_worker=1",
        f"run.storage={tmp}", "run.name=bench", "data.shuffle_buffer=0"])


def plain_loop(cfg, rows, device, amp, log_every) -> list[float]:
    """images/s per log interval of the same step, without Ray."""
    torch.manual_seed(0)
    model = Pretrainer(ViT(cfg.model), "softmax").to(device)
    opt = make_optimizer(model, decay_names(model), cfg, device)
    n, B = len(rows["label"]), cfg.train.global_batch_size
    rates, start = [], time.perf_counter()
    for step in range(cfg.train.total_steps):
        i = (step * B) % (n - B + 1)
        x = to_model_input(torch.from_numpy(rows["image"][i:i + B]).to(device))
        y = torch.from_numpy(rows["label"][i:i + B]).to(device)
        lr = learning_rate(step, cfg.optim.lr, cfg.train.total_steps, 5)
        train_step(model, opt, [(x, y)], lr, 1.0, amp)
        if (step + 1) % log_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(log_every * B / (time.perf_counter() - start))
            start = time.perf_counter()
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="Ti/16")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--cpus", type=float, default=2, help="CPUs (torch threads) per worker")
    ap.add_argument("--gpu", action="store_true", help="one GPU, bf16 autocast, MFU")
    args = ap.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.data.synthetic import noise_dataset
    from pipeline.train.run import pretrain

    ray.init(address="local", num_cpus=max(int(args.cpus), 1) + 1, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    device = torch.device("cuda" if args.gpu else "cpu")
    amp = torch.bfloat16 if args.gpu else None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, tmp)
        samples = args.batch_size * args.steps
        # One materialised dataset for both loops: data generation is not what is measured.
        ds = noise_dataset(samples, 1000, cfg.model.image_size, 1).materialize()
        rows = _collect(ds)
        out = pretrain(cfg, tracking_uri=f"sqlite:///{tmp}/m.db", dataset=ds)
        hist = MlflowClient(f"sqlite:///{tmp}/m.db").get_metric_history(
            out.run_id, "perf/images_per_sec")
        ray_rates = [m.value for m in sorted(hist, key=lambda m: m.step)][1:]
        waits = [m.value for m in sorted(MlflowClient(f"sqlite:///{tmp}/m.db").get_metric_history(
            out.run_id, "perf/data_wait_frac"), key=lambda m: m.step)][1:]
        ray.shutdown()

        torch.set_num_threads(int(args.cpus))
        torch.set_flush_denormal(True)
        plain_rates = plain_loop(cfg, rows, device, amp, args.log_every)[1:]

    ray_ips, plain_ips = statistics.median(ray_rates), statistics.median(plain_rates)
    where = torch.cuda.get_device_name(0) if args.gpu else f"CPU, {int(args.cpus)} threads"
    print(f"ViT-{args.variant} @ {args.image_size}px, batch {args.batch_size}, "
          f"{'bf16' if args.gpu else 'fp32'}, {where}; median of {len(ray_rates)} intervals "
          f"of {args.log_every} steps after the first")
    print(f"{'loop':<28}{'images/s':>10}")
    print(f"{'plain single process':<28}{plain_ips:>10.1f}")
    print(f"{'Ray Train (1 worker)':<28}{ray_ips:>10.1f}")
    print(f"ratio Ray / plain: {ray_ips / plain_ips:.3f}   (goal >= 0.97)")
    print(f"Ray loop time waiting for data: {statistics.median(waits):.1%} (median)")
    if args.gpu:
        flops = train_flops_per_image(cfg.model)
        peak = peak_flops(device)
        print(f"MFU: Ray {ray_ips * flops / peak:.1%}, plain {plain_ips * flops / peak:.1%} "
              f"({flops / 1e9:.1f} GFLOP/image, peak {peak / 1e12:.0f} TFLOP/s)")


def _collect(ds) -> dict:
    import numpy as np

    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}


if __name__ == "__main__":
    main()
