"""The Ray Train worker loop: build, wrap, restore, loop over `train_step`, log, checkpoint.

Everything numeric lives in plain PyTorch (`Pretrainer`, `train_step`); this file adds the
distribution (Ray Train context, DDP / FSDP wrapping in `wrap`, the only place it happens),
the data shard, MLflow from rank 0, and checkpoints through `ray.train.report`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.data.transforms import to_model_input
from pipeline.model import NO_DECAY_NAMES, Block, ViT
from pipeline.perf import peak_flops, train_flops_per_image
from pipeline.train import state as train_state
from pipeline.train.config import PretrainConfig
from pipeline.train.fewshot import lsr_accuracy
from pipeline.train.objectives import MaskedPatchPrediction, sigmoid_xent, softmax_xent
from pipeline.train.schedule import learning_rate

log = logging.getLogger("pipeline.train")


class NonFiniteLoss(RuntimeError):
    pass


class Pretrainer(nn.Module):
    """The ViT and its pretraining objective, as one module (so DDP / FSDP see every
    trainable parameter, the MPP head and mask token included)."""

    def __init__(self, vit: ViT, objective: str):
        super().__init__()
        self.vit = vit
        self.objective = objective
        self.mpp = MaskedPatchPrediction(vit.cfg.hidden_size) if objective == "mpp" else None

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
               grad_clip: float, amp_dtype: torch.dtype | None) -> tuple[float, float]:
    """One optimizer step over the micro-batches of this worker (gradient accumulation).
    -> (mean loss on this worker, global grad norm before clipping). Raises NonFiniteLoss
    before the update when the loss or the gradient is not finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n = len(micro_batches)
    total = 0.0
    device_type = micro_batches[0][0].device.type
    for i, (images, labels) in enumerate(micro_batches):
        # Skip the gradient all-reduce on all but the last micro-batch.
        sync = contextlib.nullcontext() if i == n - 1 or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = model(images, labels) / n
            loss.backward()
        total += loss.detach().float()
    clip = grad_clip if grad_clip > 0 else math.inf
    if hasattr(model, "clip_grad_norm_"):          # FSDP: the norm over all shards
        grad_norm = model.clip_grad_norm_(clip)
    else:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
    loss_value, norm_value = float(total), float(grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss {loss_value}, gradient norm {norm_value}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


@dataclass
class Meter:
    loss: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    images: int = 0                # images this worker trained on in the interval
    data_s: float = 0.0
    start: float = 0.0

    def reset(self):
        self.loss = self.grad_norm = self.data_s = 0.0
        self.steps = self.images = 0
        self.start = time.perf_counter()


def wrap(model: nn.Module, cfg: PretrainConfig) -> nn.Module:
    """DDP by default, FSDP for L and H (or when asked): the one place parallel wrapping
    happens. The model itself never sees a process group."""
    import ray.train.torch

    strategy = cfg.train.parallel
    if strategy == "auto":  # FSDP for L and H on GPUs (Ray Train's FSDP is GPU-only)
        strategy = "fsdp" if cfg.model.hidden_size >= 1024 and cfg.scale.use_gpu else "ddp"
    kwargs = None
    if strategy == "fsdp":
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        kwargs = {"auto_wrap_policy": functools.partial(transformer_auto_wrap_policy,
                                                        transformer_layer_cls={Block}),
                  "use_orig_params": True}
    model = ray.train.torch.prepare_model(model, parallel_strategy=strategy,
                                          parallel_strategy_kwargs=kwargs)
    if cfg.train.compile:
        model = torch.compile(model)
    return model


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter name. A
    collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------
# The worker function
# ---------------------------------------------------------------------------------------------
def train_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`. `config`: {"cfg": PretrainConfig dict, "run_id",
    "tracking_uri", "health" (data-health actor or None), "resume", "init", "spill_uri",
    "fewshot": prepared probe set or None}."""
    import ray
    import ray.train

    cfg = PretrainConfig.from_dict(config["cfg"])
    _quiet_ray_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    amp = torch.bfloat16 if (cfg.train.precision == "bf16" or
                             (cfg.train.precision == "auto" and gpu)) else None
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # Subnormal floats appear as training goes on and make CPU math ~10x slower
        # (measured: 4.3k -> 0.32k images/s on the smoke run after 30 steps).
        torch.set_flush_denormal(True)

    # Build on every rank from the same seed, so the replicas start identical.
    torch.manual_seed(cfg.train.seed)
    module = Pretrainer(ViT(cfg.model), cfg.train.objective)
    decay = decay_names(module)
    pos, optim_state = restore(module, cfg, config)
    torch.manual_seed(cfg.train.seed + 1000 * rank + pos.step)  # dropout / MPP noise
    np.random.seed((cfg.train.seed + 1000 * rank + pos.step) % 2**32)
    model = wrap(module, cfg)
    optimizer = make_optimizer(model, decay, cfg, device)
    if optim_state is not None:
        load_optimizer(model, optimizer, optim_state)

    probe = None
    if rank == 0 and config.get("fewshot") is not None:
        probe = ray.get(config["fewshot"])
    tracker = None
    if rank == 0 and config.get("run_id"):
        from pipeline.tracking import Tracker

        tracker = Tracker(config["tracking_uri"], config["run_id"], config.get("spill_uri"))
    if rank == 0:
        log.info("start at step %d (%s); %d workers x %d micro-batch x %d accumulation = "
                 "global batch %d; device %s, %d torch threads", pos.step, pos.source, world,
                 cfg.micro_batch, cfg.accumulation_steps, cfg.train.global_batch_size, device,
                 torch.get_num_threads())
        if tracker is not None:  # every (re)start is visible in the run's history
            tracker.log_metrics({"train/start_step": pos.step}, pos.step)

    from pipeline.data.source import InputConfig, iter_batches

    shard = ray.train.get_dataset_shard("train")
    batches = iter(iter_batches(shard, cfg.micro_batch, InputConfig(
        shuffle_buffer=cfg.data.shuffle_buffer), drop_last=True, seed=cfg.train.seed + rank))
    flops = train_flops_per_image(cfg.model) if gpu else None
    peak = peak_flops(device) if gpu else None
    meter = Meter()
    meter.reset()
    step, error = pos.step, None
    if step >= cfg.train.total_steps and rank == 0:
        log.info("already at step %d of %d: nothing to train (raise train.total_steps to "
                 "continue)", step, cfg.train.total_steps)
    while step < cfg.train.total_steps:
        t0 = time.perf_counter()
        try:
            micro = [next(batches) for _ in range(cfg.accumulation_steps)]
        except StopIteration:
            error = f"the data ran out at step {step}; check the dataset and data.split"
            break
        except Exception as err:  # noqa: BLE001 - a data error ends the run with its message
            if "bad data in" not in str(err) and "DataError" not in repr(err):
                raise
            error = "data error: " + _last_line(err, "bad data in")
            break
        meter.data_s += time.perf_counter() - t0
        micro = [(to_model_input(b["image"].to(device, non_blocking=True)),
                  b["label"].to(device, non_blocking=True)) for b in micro]
        lr = learning_rate(step, cfg.optim.lr, cfg.train.total_steps, cfg.optim.warmup_steps,
                           cfg.optim.decay, cfg.optim.end_lr)
        try:
            loss, grad_norm = train_step(model, optimizer, micro, lr, cfg.optim.grad_clip, amp)
        except NonFiniteLoss as err:
            error = f"non-finite loss at step {step + 1}: {err}; lower optim.lr or check the data"
            break
        step += 1
        meter.images += sum(len(x) for x, _ in micro)
        meter.loss += loss
        meter.grad_norm += grad_norm
        meter.steps += 1

        last = step == cfg.train.total_steps
        metrics = None
        if step % cfg.train.log_every == 0 or last:
            metrics = interval_metrics(meter, cfg, lr, world, flops, peak)
            # The batch that really went into each optimizer step, summed over workers.
            metrics["train/images_per_step"] = _all_sum(meter.images, device) / meter.steps
            if rank == 0 and config.get("health") is not None:
                metrics["data/skipped_samples"] = _skipped(config["health"])
            if probe is not None and cfg.train.fewshot_every and (
                    step % cfg.train.fewshot_every == 0 or last):
                metrics.update(fewshot_metrics(module.vit, probe, device, amp))
            if rank == 0:
                log.info(progress_line(step, cfg.train.total_steps, metrics))
                if tracker is not None:
                    tracker.log_metrics(metrics, step)
            meter.reset()
        # Only checkpoints go through ray.train.report: each report waits for the controller
        # to collect it (its poll interval, 2 s by default), so reporting every log step cost
        # the smoke run 90% of its throughput. Metrics go to MLflow from rank 0 instead.
        if step % cfg.train.checkpoint_every == 0 or last:
            save_checkpoint(model, optimizer, cfg, step, metrics or {"step": step}, rank,
                            config.get("data_plan"), config.get("run_id"))
    if error is not None and rank == 0:
        # Told to the driver through its status actor, not by raising: an exception would
        # make Ray Train restart the workers (FailureConfig), and these errors would recur.
        log.error(error)
        if config.get("status") is not None:
            ray.get(config["status"].fail.remote(error))
    if tracker is not None:
        tracker.close()


def _all_sum(value: float, device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return float(t.item())


def _quiet_ray_reports() -> None:
    """Ray Train logs every report with all its metrics at INFO; our progress line says the
    same in one line. (Its logger is named by file path, hence the lookup.)"""
    try:
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _last_line(err: Exception, marker: str) -> str:
    text = str(err)
    i = text.rfind(marker)
    return text[i:].splitlines()[0] if i >= 0 else text.splitlines()[-1]


def _skipped(health) -> float:
    import ray

    try:
        return float(ray.get(health.summary.remote(), timeout=10)["skipped"])
    except Exception:  # noqa: BLE001 - metrics must never stop training
        return float("nan")


def interval_metrics(meter: Meter, cfg: PretrainConfig, lr: float, world: int,
                     flops: float | None, peak: float | None) -> dict:
    elapsed = max(time.perf_counter() - meter.start, 1e-9)
    images_per_sec = meter.steps * cfg.train.global_batch_size / elapsed
    metrics = {"train/loss": meter.loss / max(meter.steps, 1),
               "train/lr": lr,
               "train/grad_norm": meter.grad_norm / max(meter.steps, 1),
               "perf/images_per_sec": images_per_sec,
               "perf/data_wait_frac": meter.data_s / elapsed}
    if flops and peak:
        metrics["perf/mfu"] = images_per_sec * flops / (peak * world)
    return metrics


def progress_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}",
             f"|g| {m['train/grad_norm']:.2f}", f"{m['perf/images_per_sec']:.1f} img/s",
             f"data wait {m['perf/data_wait_frac']:.0%}"]
    if "perf/mfu" in m:
        parts.append(f"MFU {m['perf/mfu']:.1%}")
    if m.get("data/skipped_samples"):
        parts.append(f"skipped {m['data/skipped_samples']:.0f}")
    parts += [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items() if k.startswith("fewshot/")]
    return " | ".join(parts)


@torch.no_grad()
def fewshot_metrics(vit: ViT, probe: dict, device, amp) -> dict:
    """Closed-form few-shot accuracy of the frozen representation on the probe set."""
    was_training = vit.training
    vit.eval()
    feats = []
    images = probe["images"]
    for i in range(0, len(images), 256):
        x = to_model_input(torch.from_numpy(images[i:i + 256]).to(device))
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            feats.append(vit.forward_features(x).float().cpu())
    vit.train(was_training)
    feats, labels = torch.cat(feats), torch.from_numpy(probe["labels"])
    return {f"fewshot/{probe['name']}/{k}shot": lsr_accuracy(feats, labels, k)
            for k in probe["shots"]}


def data_position(plan: dict | None, cfg: PretrainConfig, samples: int) -> tuple[int, int]:
    """(epoch, shard position in that epoch's order) of the stream after `samples`."""
    if plan is None:  # synthetic: (epoch, sample index)
        return divmod(samples, max(cfg.data.synthetic_samples, 1))
    from pipeline.data.source import position_after

    return position_after(plan["manifest"], plan["split"], plan["seed"], samples)


def save_checkpoint(model, optimizer, cfg: PretrainConfig, step: int, metrics: dict,
                    rank: int, plan: dict | None = None, run_id: str | None = None) -> None:
    import ray.train

    model_state, optim_state = full_state(model, optimizer)  # collective
    if rank != 0:
        ray.train.report({**metrics, "step": step}, checkpoint=None)
        return
    vit_state = {k[len("vit."):]: v for k, v in model_state.items() if k.startswith("vit.")}
    objective = {k: v for k, v in model_state.items() if not k.startswith("vit.")}
    with tempfile.TemporaryDirectory() as tmp:
        train_state.write(tmp, vit_state=vit_state, vit_cfg=cfg.model,
                          optimizer_state=optim_state, objective_state=objective, step=step,
                          samples_seen=step * cfg.train.global_batch_size,
                          data_position=data_position(plan, cfg,
                                                      step * cfg.train.global_batch_size),
                          config=cfg.to_dict(), run_name=cfg.run.name, run_id=run_id)
        ray.train.report({**metrics, "step": step},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{step:08d}")


def restore(module: Pretrainer, cfg: PretrainConfig, config: dict):
    """The resume order: this run's latest checkpoint > --resume > --init > scratch.
    Loads the weights into `module`; -> (Position, optimizer state or None)."""
    import ray.train

    own = ray.train.get_checkpoint()
    if own is not None:
        with own.as_directory() as d:
            return _load_training_checkpoint(module, cfg, d, "this run's checkpoint")
    if config.get("resume"):
        from pipeline import storage

        with tempfile.TemporaryDirectory() as tmp:
            local = storage.fetch(config["resume"], tmp)
            return _load_training_checkpoint(module, cfg, local, f"--resume {config['resume']}")
    if config.get("init"):
        train_state.init_weights(module.vit, config["init"])
        return train_state.Position(source=f"--init {config['init']}"), None
    return train_state.Position(source="scratch"), None


def _load_training_checkpoint(module: Pretrainer, cfg: PretrainConfig, directory, where: str):
    from pipeline.checkpoint import load_vit

    doc, trainer = train_state.read(directory)
    train_state.check_architecture(doc["config"]["model"], cfg.model, where)
    vit = load_vit(directory)
    state = {f"vit.{k}": v for k, v in vit.state_dict().items()}
    state.update(trainer.get("objective", {}))
    module.load_state_dict(state, strict=True)
    torch.set_rng_state(trainer["torch_rng"])
    train_state.set_rng_state(doc["rng"])
    pos = train_state.Position(step=doc["step"], samples_seen=doc["samples_seen"], source=where)
    return pos, trainer["optimizer"]
