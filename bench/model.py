"""Forward+backward throughput of our ViT against Hugging Face transformers' ViT.

Same config on both sides (width, depth, heads, MLP, patch, image size, LayerNorm eps 1e-6,
exact GELU, SDPA attention), same batch, same loss (cross-entropy on random labels). The two
models are timed in alternating rounds so that machine noise hits both alike; the median of
the rounds is reported.

    python bench/model.py                                   # CPU: Ti/16, fp32
    python bench/model.py --variant B/16 --batch-size 256   # GPU: bf16 autocast

With `--hybrid R50+B/16` the baseline is our pure ViT of the same size (B/16) instead of
Hugging Face's, and the figures add the forward GFLOPs per image of each (paper Fig. 5 sets
the hybrids' accuracy against this compute):

    python bench/model.py --hybrid R50+B/16                 # CPU: batch 8; GPU: 256, bf16

Needs the dev extra (transformers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.model import ViT, ViTConfig


def hf_model(cfg: ViTConfig):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf_cfg = HFConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
                      image_size=cfg.image_size, patch_size=cfg.patch_size,
                      num_labels=cfg.num_classes, layer_norm_eps=cfg.norm_eps,
                      hidden_act="gelu", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(hf_cfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def make_step(model, images, labels, device, dtype):
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(images)
            logits = out.logits if hasattr(out, "logits") else out
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def time_round(step, steps: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_alternating(steps_fn: dict, rounds: int, batch: int, steps: int, device):
    """Images/s of each step function over `rounds` alternating rounds, so that machine noise
    hits all alike -> (rates per round, medians, where it ran)."""
    rates = {name: [] for name in steps_fn}
    for _ in range(rounds):
        for name, step in steps_fn.items():
            rates[name].append(batch * steps / time_round(step, steps, device))
    med = {name: statistics.median(r) for name, r in rates.items()}
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    return rates, med, where


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default=None, help="e.g. Ti/16 (CPU default), B/16 (GPU default)")
    ap.add_argument("--batch-size", type=int, default=None, help="32 on CPU, 256 on GPU")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=None, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per model")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 CPU, bf16 GPU), fp32, bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    ap.add_argument("--hybrid", metavar="VARIANT",
                    help="time this hybrid (e.g. R50+B/16) against our ViT of its size")
    args = ap.parse_args()
    if args.hybrid:
        return bench_hybrid(args)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16}[args.dtype]
    variant = args.variant or ("B/16" if gpu else "Ti/16")
    batch = args.batch_size or (256 if gpu else 32)
    steps = args.steps or (20 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ViTConfig.from_variant(variant, image_size=args.image_size, num_classes=1000)

    torch.manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    models = {"ours": ViT(cfg), "hf": hf_model(cfg)}
    steps_fn = {}
    for name, model in models.items():
        model.to(device).train()
        torch.nn.init.normal_(model.get_submodule("head" if name == "ours" else "classifier")
                              .weight, std=0.02)  # a zero head would skip body gradients
        steps_fn[name] = make_step(model, images, labels, device, dtype)
        for _ in range(2):  # warm-up: allocator, kernels, autotuning
            steps_fn[name]()

    rates, med, where = time_alternating(steps_fn, args.rounds, batch, steps, device)
    print(f"ViT-{variant} @ {cfg.image_size}px, batch {batch}, {str(dtype)[6:]}, {where}; "
          f"forward+backward, median of {args.rounds} rounds x {steps} steps")
    print(f"{'model':<24}{'images/s':>12}{'min':>10}{'max':>10}")
    for name, label in (("ours", "ours (pipeline.model)"), ("hf", "Hugging Face ViT")):
        print(f"{label:<24}{med[name]:>12.1f}{min(rates[name]):>10.1f}{max(rates[name]):>10.1f}")
    print(f"ratio ours / Hugging Face: {med['ours'] / med['hf']:.3f}")
    if gpu:
        from pipeline.perf import peak_flops, train_flops_per_image

        flops = train_flops_per_image(cfg)
        peak = peak_flops(device)
        for name in models:
            print(f"MFU {name}: {med[name] * flops / peak:.1%} "
                  f"({flops / 1e9:.1f} GFLOP/image train, peak {peak / 1e12:.0f} TFLOP/s)")


def bench_hybrid(args) -> None:
    """The hybrid against the pure ViT of the same encoder size (R50+B/16 against B/16):
    forward+backward images/s in alternating rounds, forward GFLOPs per image (the ResNet's
    share), and MFU on a GPU."""
    from pipeline.perf import forward_flops_per_image, resnet_macs

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16}[args.dtype]
    batch = args.batch_size or (256 if gpu else 8)
    steps = args.steps or (20 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    hybrid = ViTConfig.from_variant(args.hybrid, image_size=args.image_size, num_classes=1000)
    size = hybrid.variant.split("+")[1].split("/")[0] if hybrid.variant else "B"
    plain = ViTConfig.from_variant(f"{size}/{hybrid.effective_patch_size}",
                                   image_size=args.image_size, num_classes=1000)
    cfgs = {plain.variant: plain, hybrid.variant or args.hybrid: hybrid}
    torch.manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    steps_fn = {}
    for name, cfg in cfgs.items():
        model = ViT(cfg).to(device).train()
        torch.nn.init.normal_(model.head.weight, std=0.02)
        steps_fn[name] = make_step(model, images, labels, device, dtype)
        for _ in range(2):
            steps_fn[name]()
    rates, med, where = time_alternating(steps_fn, args.rounds, batch, steps, device)
    print(f"{args.image_size}px, batch {batch}, {str(dtype)[6:]}, {where}; forward+backward, "
          f"median of {args.rounds} rounds x {steps} steps")
    print(f"{'model':<12}{'params':>9}{'GFLOPs fwd':>12}{'(ResNet)':>10}{'images/s':>11}"
          f"{'min':>9}{'max':>9}")
    for name, cfg in cfgs.items():
        params = sum(p.numel() for p in ViT(cfg).parameters()) / 1e6
        fwd = forward_flops_per_image(cfg) / 1e9
        stem = 2 * resnet_macs(cfg)[0] / 1e9 if cfg.is_hybrid else 0.0
        print(f"{name:<12}{params:>8.1f}M{fwd:>12.1f}{stem:>10.1f}{med[name]:>11.2f}"
              f"{min(rates[name]):>9.2f}{max(rates[name]):>9.2f}")
    a, b = cfgs
    print(f"{b} / {a}: {med[b] / med[a]:.3f} x the images/s for "
          f"{forward_flops_per_image(cfgs[b]) / forward_flops_per_image(cfgs[a]):.3f} x the FLOPs")
    if gpu:
        from pipeline.perf import peak_flops, train_flops_per_image

        peak = peak_flops(device)
        for name, cfg in cfgs.items():
            print(f"MFU {name}: {med[name] * train_flops_per_image(cfg) / peak:.1%}")


if __name__ == "__main__":
    main()
