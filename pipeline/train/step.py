"""The pretraining step in plain PyTorch: the model with its objective, the optimizer, and one
optimizer step over a worker's micro-batches. No Ray here; `loop.py` runs it on Ray Train.

The step never waits for the device: the loss and the gradient norm stay on the device as
0-d tensors, and the finite check is a device-side flag the loop reads at its log steps.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model import NO_DECAY_NAMES, ViT
from pipeline.train.config import PretrainConfig
from pipeline.train.objectives import MaskedPatchPrediction, sigmoid_xent, softmax_xent
from pipeline.train.parallel import accumulation_context, clip_grad_norm


class NonFiniteLoss(RuntimeError):
    pass


class Pretrainer(nn.Module):
    """The ViT and its pretraining objective, as one module: DDP / FSDP see every trainable
    parameter (the MPP head and mask token included), and every computation goes through this
    module's `forward`, where FSDP gathers the parameters.

    `forward(images, labels)` -> the mean loss; `forward(images)` -> the pre-logits (B, D)
    the few-shot probe uses. `head_bias`: the classifier's initial bias
    (`TrainConfig.head_bias`)."""

    def __init__(self, vit: ViT, objective: str, head_bias: float = 0.0):
        super().__init__()
        self.vit = vit
        if vit.head is not None and head_bias:
            with torch.no_grad():
                vit.head.bias.fill_(head_bias)
        self.objective = objective
        self.mpp = MaskedPatchPrediction(vit.cfg.hidden_size) if objective == "mpp" else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:      # the pre-logits, as big_vision's few-shot evaluator reads
            return self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
        if self.mpp is not None:
            return self.mpp(self.vit, images)
        logits = self.vit(images)
        return sigmoid_xent(logits, labels) if self.objective == "sigmoid" else \
            softmax_xent(logits, labels)


def decay_names(module: nn.Module) -> set[str]:
    """Parameters that take weight decay: weight matrices, not biases, norms, the position
    embedding, the class token or the mask token."""
    return {n for n, p in module.named_parameters()
            if p.ndim >= 2 and n.split(".")[-1] not in NO_DECAY_NAMES + ("mask_token",)}


def clean_name(name: str) -> str:
    for wrapper in ("module.", "_fsdp_wrapped_module.", "_orig_mod.",
                    "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def make_optimizer(model: nn.Module, decay: set[str], cfg: PretrainConfig,
                   device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on the weight matrices only."""
    groups = {True: [], False: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[clean_name(name) in decay].append(p)
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": groups[True], "weight_decay": o.weight_decay},
         {"params": groups[False], "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches, lr: float,
               grad_clip: float, amp_dtype: torch.dtype | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the micro-batches of this worker (gradient accumulation).
    -> (mean loss on this worker, global grad norm before clipping), 0-d tensors on the device;
    the loop checks them for finiteness, for a whole logging interval at once, when it next
    reads them (`loop.py`: all-reduced over the workers, NonFiniteLoss naming the first bad
    step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    total = None
    device_type = micro_batches[0][0].device.type
    for i, (images, labels) in enumerate(micro_batches):
        # Gradients are reduced across workers on the last micro-batch only.
        with accumulation_context(model, last=i == n - 1):
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = model(images, labels) / n
            loss.backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
    grad_norm = clip_grad_norm(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm.detach().float()
