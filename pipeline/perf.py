"""Model FLOPs and accelerator peaks, for MFU (PaLM, Chowdhery et al. 2022, App. B)."""

from __future__ import annotations

import torch

from pipeline.model import ViTConfig

# Dense bf16 peak FLOP/s by device-name substring (no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def forward_flops_per_image(cfg: ViTConfig) -> float:
    """Forward FLOPs (2 x MACs) of one image, counting the matmuls and convolutions as
    timm's fvcore does: MACs = L [N 12 D^2 + 2 N^2 D] + (N - 1) 3 P^2 D, N tokens including
    the class token (written for an MLP of any width: 4 N D^2 attention projections + 2 N D M
    MLP); a hybrid adds its ResNet's convolutions and embeds C' channels instead of 3."""
    N = cfg.num_patches + cfg.num_prefix_tokens
    D, M, P = cfg.hidden_size, cfg.mlp_dim, cfg.patch_size
    C = cfg.num_channels
    macs = 0
    if cfg.is_hybrid:
        stem_macs, C = resnet_macs(cfg)
        macs += stem_macs
    per_layer = N * (4 * D * D + 2 * D * M) + 2 * N * N * D
    macs += cfg.depth * per_layer + cfg.num_patches * C * P * P * D
    return 2.0 * macs


def resnet_macs(cfg: ViTConfig) -> tuple[int, int]:
    """(multiply-accumulates of a hybrid's ResNet for one image, its output channels): each
    convolution costs output pixels x k^2 x in x out ("SAME": ceil(size / stride) pixels)."""
    def down(size: int, stride: int) -> int:
        return -(-size // stride)

    size = down(cfg.image_size, 2)                             # root conv 7x7/2
    width = cfg.resnet_width
    macs = size * size * 49 * cfg.num_channels * width
    size = down(size, 2)                                       # max pool 3x3/2
    cin = width
    for i, units in enumerate(cfg.resnet_layers):
        w = width * 2**i
        for j in range(units):
            stride = 2 if (i > 0 and j == 0) else 1
            out = down(size, stride)
            macs += size * size * cin * w                      # conv1 1x1
            macs += out * out * 9 * w * w                      # conv2 3x3, stride
            macs += out * out * w * 4 * w                      # conv3 1x1
            if cin != 4 * w or stride != 1:
                macs += out * out * cin * 4 * w                # projection 1x1, stride
            size, cin = out, 4 * w
    return macs, cin


def train_flops_per_image(cfg: ViTConfig) -> float:
    """Training FLOPs: forward + backward = 3 x forward."""
    return 3.0 * forward_flops_per_image(cfg)


def accelerator_hours(cfg, peak: float = PEAK_BF16["H100"], mfu: float = 0.45) -> float:
    """Hours of one accelerator a pretraining config takes: train FLOPs per image x the
    images of `train.total_steps` at `train.global_batch_size`, at `mfu` of `peak`."""
    images = cfg.train.total_steps * cfg.train.global_batch_size
    return train_flops_per_image(cfg.model) * images / (peak * mfu) / 3600


def peak_flops(device: torch.device | str) -> float:
    """Dense bf16 peak of a CUDA device; raises for devices not in the table."""
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    raise ValueError(f"no bf16 peak known for {name!r}; add it to pipeline.perf.PEAK_BF16")
