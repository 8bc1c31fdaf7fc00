"""Fine-tuning one VTAB-1k task: plain PyTorch, no Ray (ViT paper App. B.1.1).

The ViT recipe (App. B.1.1, Table 4): remove the whole pre-training head and attach one
zero-initialised linear layer; resample the position embedding to the fine-tuning resolution;
SGD with momentum 0.9, no weight decay, batch 512, linear warmup then cosine decay, gradient
clipping at global norm 1; inputs in [-1, 1]. Training images come pre-resized (448/384 of the
resolution when the task crops): a batch takes a random crop and a random horizontal flip,
with BiT Supp. F's per-task exceptions. bf16 autocast on GPU, float32 weights and optimizer.

The batch is accumulated over micro-batches when it does not fit: on GPU the first step tries
the whole batch and halves the micro-batch after an out-of-memory error until it fits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from eval.recipe import (  # noqa: F401 - re-exported
    AUGREG_NAME,
    PAPER_FINETUNE_DROPOUT,
    FinetuneConfig,
    finetune_dropout,
    is_augreg,
)
from pipeline import timeline
from pipeline.data.transforms import to_model_input
from pipeline.model import ViT, ViTConfig
from pipeline.schedule import learning_rate


class FinetuneError(RuntimeError):
    """A fine-tuning run that cannot go on (one line)."""


def build_model(config: dict, state: dict[str, torch.Tensor], num_classes: int,
                resolution: int) -> ViT:
    """The pre-trained ViT with the fine-tuning head (zero-init, K classes) at `resolution`;
    `config` carries the fine-tuning dropout (`finetune_dropout`), not the checkpoint's."""
    model = ViT(ViTConfig.from_dict(config))
    model.load_state_dict(state, strict=True)
    model.reset_head(num_classes)
    model.set_image_size(resolution)
    return model


def augment_batch(images: torch.Tensor, size: int, crop: bool, flip: bool,
                  gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, R, R, 3) -> (B, size, size, 3): a random size x size crop per image (when
    `crop`; else R must equal size) and a random horizontal flip (when `flip`)."""
    B, R = images.shape[0], images.shape[1]
    if crop and R > size:
        xs = torch.randint(0, R - size + 1, (B,), generator=gen)
        ys = torch.randint(0, R - size + 1, (B,), generator=gen)
        ar = torch.arange(size)
        rows = (ys[:, None] + ar)[:, :, None]                       # (B, S, 1)
        cols = (xs[:, None] + ar)[:, None, :]                       # (B, 1, S)
        images = images[torch.arange(B)[:, None, None], rows, cols]  # (B, S, S, 3)
    elif R != size:
        raise ValueError(f"training images are {R} px, expected {size}")
    if flip:
        flips = torch.rand(B, generator=gen) < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(2), images)
    return images


class BatchSampler:
    """Indices for each step: epochs of random permutations (shuffle + repeat), seeded."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order, self.pos = n, np.random.default_rng(seed), None, n

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self.pos >= self.n:
                self.order, self.pos = self.rng.permutation(self.n), 0
            m = min(k, self.n - self.pos)
            out.append(self.order[self.pos:self.pos + m])
            self.pos, k = self.pos + m, k - m
        return np.concatenate(out)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def finetune(model: ViT, images: np.ndarray, labels: np.ndarray, cfg: FinetuneConfig, *,
             lr: float, seed: int, crop: bool, flip: bool, device: torch.device | str = "cpu",
             progress: Callable[[int, float], None] | None = None, progress_every: int = 0
             ) -> dict:
    """Fine-tune `model` in place on uint8 images (N, R, R, 3) at `lr`, with the batches and
    crops of `seed`; -> {"train_loss", "micro_batch_size", "train_time_s", "images_per_s"}.
    `progress(step, loss)` is called every `progress_every` steps."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    device = torch.device(device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(len(labels), seed)
    micro = cfg.micro_batch_size or (cfg.batch_size if device.type == "cuda" else 32)
    micro = min(micro, cfg.batch_size)
    loss_value, start, smoothed = float("nan"), time.perf_counter(), None
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr, cfg.steps, cfg.warmup, "cosine")
        # Indexing copies the batch out of the (read-only, shared) object-store arrays.
        idx = sampler.take(cfg.batch_size)
        batch = augment_batch(torch.from_numpy(images[idx]), cfg.resolution, crop, flip, gen)
        batch_targets = torch.from_numpy(labels[idx])
        while True:
            try:
                loss_value = _accumulate(model, batch, batch_targets, micro, device)
                break
            except torch.OutOfMemoryError:
                if micro == 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                micro = max(1, micro // 2)
        if not math.isfinite(loss_value):
            raise FinetuneError(f"non-finite loss at step {step + 1} (lr {lr}); use a "
                                f"smaller learning rate")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if smoothed is None:
            timeline.mark("trial.first_step")
        smoothed = loss_value if smoothed is None else 0.9 * smoothed + 0.1 * loss_value
        if progress is not None and progress_every and (step + 1) % progress_every == 0:
            progress(step + 1, smoothed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"train_loss": float(smoothed if smoothed is not None else loss_value),
            "micro_batch_size": micro, "train_time_s": elapsed,
            "images_per_s": cfg.steps * cfg.batch_size / max(elapsed, 1e-9)}


def _accumulate(model: ViT, batch: torch.Tensor, targets: torch.Tensor, micro: int,
                device: torch.device) -> float:
    """Forward + backward over the batch in micro-batches; gradients of the batch mean."""
    total, B = 0.0, batch.shape[0]
    for lo in range(0, B, micro):
        x = to_model_input(batch[lo:lo + micro].to(device, non_blocking=True),
                           model.cfg.input_mean, model.cfg.input_std)
        y = targets[lo:lo + micro].to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum") / B
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def predict(model: ViT, chunks: Iterable[np.ndarray], device: torch.device | str = "cpu",
            batch_size: int = 256) -> np.ndarray:
    """Class predictions for uint8 image chunks (n, S, S, 3), in order."""
    device = torch.device(device)
    model.to(device).eval()
    preds = []
    for chunk in chunks:
        for lo in range(0, len(chunk), batch_size):
            x = to_model_input(torch.tensor(chunk[lo:lo + batch_size]).to(device),  # a copy
                               model.cfg.input_mean, model.cfg.input_std)
            with _autocast(device):
                logits = model(x)
            preds.append(logits.float().argmax(-1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def top1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        raise FinetuneError("no evaluation images")
    return 100.0 * float((preds == labels).mean())
