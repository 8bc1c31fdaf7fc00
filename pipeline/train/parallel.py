"""Parallel wrapping: the one place where the model meets a process group.

- `ddp`: replicated weights, gradients all-reduced (Ray Train's `prepare_model`). The default
  for Ti, S and B, whose weights and Adam state fit on any accelerator many times over.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per encoder block (and one
  for a hybrid's ResNet) plus the root (patch embedding, tokens, norms, heads, the MPP head).
  Parameters, gradients and Adam state are sharded over all workers; each unit's weights
  are all-gathered just before its forward and backward, and freed after. The default for L
  and H on GPUs.
- `hsdp`: FSDP2 over a 2-D mesh (replicate, shard): sharded within a group of
  `train.shard_group_size` workers (default: the workers of one node, whose links are fast),
  replicated across groups (one all-reduce of the shards per step between nodes).

On GPUs the FSDP mixed-precision policy keeps fp32 master weights and Adam state, computes in
bf16 (parameters are all-gathered in bf16) and reduces gradients in fp32, as torchtitan does.
Everything the model runs goes through the wrapped module's `forward` (`Pretrainer` has a
`features` mode for the few-shot probe), so FSDP's hooks gather every parameter a
computation touches; the model itself never sees a process group.

Ray Train's own `prepare_model(parallel_strategy="fsdp")` is FSDP-1 and GPU-only, so FSDP2 is
applied here directly; it runs on CPU workers over gloo as well, which is how the tests
exercise it.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp", "hsdp")


def resolve_strategy(parallel: str, hidden_size: int, use_gpu: bool) -> str:
    """`auto` -> FSDP for L and H (width >= 1024) on GPUs, else DDP."""
    if parallel == "auto":
        return "fsdp" if hidden_size >= 1024 and use_gpu else "ddp"
    return parallel


def wrap(module: nn.Module, units: list[nn.Module], strategy: str, device: torch.device,
         amp: torch.dtype | None, shard_group_size: int = 0) -> nn.Module:
    """Wrap `module` for data-parallel training; with FSDP each of `units` (its encoder
    blocks, and a hybrid's ResNet: `ViT.shard_units()`) is sharded as a unit of its own. With
    one worker nothing is wrapped (but the module is on `device`)."""
    import torch.distributed as dist

    module.to(device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if strategy == "ddp":
        if world == 1:
            return module
        import ray.train.torch

        return ray.train.torch.prepare_model(module, parallel_strategy="ddp")
    if strategy not in ("fsdp", "hsdp"):
        raise ValueError(f"unknown parallel strategy {strategy!r}; use one of {STRATEGIES}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if world == 1 and not dist.is_initialized():
        # fully_shard needs a process group even for one rank (a GPU smoke run).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=
                                f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if strategy == "hsdp":
        shard = shard_group_size or _local_world_size() or world
        if world % shard:
            raise ValueError(f"hsdp: {world} workers are not divisible into shard groups of "
                             f"{shard}; set train.shard_group_size")
        mesh = init_device_mesh(device.type, (world // shard, shard),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else \
        MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # The last block's parameters are needed again at once by the root's backward: keeping
    # them gathered saves one all-gather per step (torchtitan does the same).
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return module


def accumulation_context(model: nn.Module, last: bool):
    """Gradient synchronisation only on the last micro-batch of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):          # FSDP2
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not last:                # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards) -> the norm before clipping, a 0-d
    tensor on the device (no host synchronisation)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf,
                                    foreach=True)
    full = getattr(norm, "full_tensor", None)                 # a DTensor under FSDP2
    return full() if full is not None else norm


def _local_world_size() -> int:
    try:
        import ray.train

        return ray.train.get_context().get_local_world_size()
    except Exception:  # noqa: BLE001 - outside Ray Train
        return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
