"""One trial of the sweep and what it is given: the pre-trained weights (loaded and checked
once, on the driver, with the name a person calls them by), the tasks' data (checked before
Ray starts; decoded once per phase in Ray tasks, shared through the object store) and the
fine-tuning run itself, in a Tune actor. The protocol that runs the trials is eval/sweep.py.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eval.errors import SweepError
from eval.tasks import BY_NAME, Task
from pipeline import timeline

if TYPE_CHECKING:
    from eval.config import VtabConfig
    from eval.finetune import FinetuneConfig
    from eval.sweep import SweepConfig


@functools.lru_cache(maxsize=64)
def model_label(checkpoint: str) -> str:
    """What a person calls the model: `<pretraining run>-step<N>` for our checkpoints (from
    their metadata), the Hub name for hf://, else the file or folder name."""
    from pipeline.weights import HUB_SCHEME, read_metadata

    if checkpoint.startswith(HUB_SCHEME):
        return checkpoint[len(HUB_SCHEME):].replace("/", "-").replace("@", "-")
    meta = read_metadata(checkpoint)
    if meta.get("run_name") and meta.get("step") is not None:
        return f"{meta['run_name']}-step{meta['step']}"
    return checkpoint.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"


@dataclass
class Pretrained:
    config: dict              # ViTConfig fields
    metadata: dict            # our format's vit.json metadata ({} for imports)
    state: dict = field(repr=False)


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be wrong is found before any trial starts
# ---------------------------------------------------------------------------------------------
def load_pretrained(cfg: VtabConfig) -> Pretrained:
    from pipeline.weights import load_vit, read_metadata

    model = load_vit(cfg.run.checkpoint)
    patch = model.cfg.effective_patch_size          # a hybrid's: pixels per token
    resolution, dropout = cfg.finetune.resolution, cfg.finetune.dropout
    if resolution < patch:
        raise SweepError(f"--resolution {resolution} is smaller than the checkpoint's "
                         f"patch size {patch}; use at least {patch}")
    # Not a multiple (H/14 at the paper's 384 px): the last resolution % patch rows and
    # columns go unused, as in vit_jax (VALID patch convolution; see ViTConfig.grid_size).
    from eval.finetune import finetune_dropout, is_augreg

    # Fine-tuning dropout: vit_jax's value for the checkpoint (0 for AugReg ones, else the
    # size's), not whatever it was pretrained with (0.1 for ours, 0.0 for imports), unless
    # --dropout says otherwise. No stochastic depth: vit_jax's fine-tuning models have none
    # (its ViT takes no drop-path rate at all).
    metadata = read_metadata(cfg.run.checkpoint)
    augreg = is_augreg(cfg.run.checkpoint, metadata.get("run_name", ""))
    config = {**model.cfg.to_dict(), "attention_dropout": 0.0, "drop_path": 0.0,
              "dropout": dropout if dropout is not None else finetune_dropout(model.cfg, augreg)}
    return Pretrained(config, metadata,
                      {k: v.detach().cpu() for k, v in model.state_dict().items()})


def check_data(cfg: VtabConfig) -> dict[str, dict[str, int]]:
    from eval.data import check_task

    return {name: check_task(cfg.data.uri, BY_NAME[name]) for name in cfg.sweep.tasks}


# ---------------------------------------------------------------------------------------------
# Data: decoded once per phase in Ray tasks, shared through the object store
# ---------------------------------------------------------------------------------------------
def _load(data_root: str, task_name: str, split: str, resolution: int, kind: str):
    """-> (the split, decoded or encoded; its size). Two returns, so that the driver can
    wait on the small one and never pull the images to itself."""
    from eval.data import decode, read_encoded, train_size

    task = BY_NAME[task_name]
    encoded = read_encoded(data_root, task, split)
    if kind == "encoded":
        return encoded, len(encoded.labels)
    size = train_size(task, resolution) if kind == "train" else resolution
    return decode(encoded, size, f"{task_name}/{split}"), len(encoded.labels)


def load_phase_data(cfg: VtabConfig, phase: str) -> dict[str, dict[str, object]]:
    """{task: {"train": ref, "eval": ref}} for a phase, loaded in parallel Ray tasks and left
    in the object store; raises TaskDataError on bad data."""
    import ray

    load = ray.remote(num_cpus=1, max_retries=2, num_returns=2)(_load)
    train_split, eval_split, eval_kind = (("train800", "val200", "eval") if phase == "select"
                                          else ("train800val200", "test", "encoded"))
    refs, sizes = {}, []
    root, resolution = cfg.data.uri, cfg.finetune.resolution
    for name in cfg.sweep.tasks:
        train, n_train = load.remote(root, name, train_split, resolution, "train")
        evaluation, n_eval = load.remote(root, name, eval_split, resolution, eval_kind)
        refs[name] = {"train": train, "eval": evaluation}
        sizes += [n_train, n_eval]
    try:
        ray.get(sizes)   # surfaces a data error here, before any trial
    except ray.exceptions.RayTaskError as err:
        raise (err.cause if err.cause is not None else err) from None
    return refs


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Tune actor)
# ---------------------------------------------------------------------------------------------
def trial(config: dict, *, data: dict, pretrained, recipe: FinetuneConfig,
          sweep: SweepConfig) -> None:
    """One fine-tuning run by `recipe`: config = {"trial": {"task", "lr", "seed", "phase"}}."""
    import numpy as np
    import ray
    import torch
    from ray import tune

    from eval.data import Encoded, decode
    from eval.finetune import FinetuneError, build_model, finetune, predict, top1
    from pipeline.schedule import learning_rate

    config = config["trial"]
    timeline.mark("trial.start")
    started_at = time.time()
    task: Task = BY_NAME[config["task"]]
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    use_gpu = sweep.gpus_per_trial > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    if use_gpu and sweep.gpus_per_trial < 1:
        # Ray's GPU fractions are logical: cap this trial's share of the device memory, so
        # that co-located trials cannot starve each other (the batch is accumulated instead).
        torch.cuda.set_per_process_memory_fraction(sweep.gpus_per_trial)
    weights = pretrained   # tune.with_parameters fetched it from the object store
    res = recipe.resolution
    model = build_model(weights.config, weights.state, task.num_classes, res)
    train = ray.get(data[task.name]["train"])
    every = max(1, recipe.steps // max(1, sweep.progress_reports))
    # The selection phase scores val200 (decoded, small) at each report too: its curve.
    evaluation = ray.get(data[task.name]["eval"]) if config["phase"] == "select" else None
    curve = Curve()

    def progress(step: int, loss: float) -> None:
        curve.add(step, loss, learning_rate(step - 1, config["lr"], recipe.steps,
                                            recipe.warmup, "cosine"))
        if step % every == 0 and step < recipe.steps:
            if evaluation is not None:
                curve.val(step, top1(predict(model, [evaluation.images], device),
                                     np.asarray(evaluation.labels)))
                model.train()
            tune.report({"step": step, "train_loss": loss})

    try:
        stats = finetune(model, train.images, train.labels, recipe, lr=config["lr"],
                         seed=config["seed"], crop=task.crop, flip=task.flip, device=device,
                         progress=progress,
                         progress_every=math.gcd(every, curve.every(recipe.steps)))
    except FinetuneError as err:
        # A learning rate that diverges is a result of the sweep, not a failure of it.
        tune.report({"step": recipe.steps, "diverged": True, "top1": float("nan"),
                     "error": str(err), "task": task.name, "started_at": started_at,
                     "finished_at": time.time(), "curve": curve.to_json()})
        return
    del train
    if evaluation is None:
        evaluation = ray.get(data[task.name]["eval"])
    if isinstance(evaluation, Encoded):   # test: decoded in chunks, never whole
        chunk = 512

        def chunks():
            for lo in range(0, len(evaluation.labels), chunk):
                yield decode(Encoded(evaluation.images[lo:lo + chunk],
                                     evaluation.labels[lo:lo + chunk]), res,
                             f"{task.name}/test").images
        preds = predict(model, chunks(), device)
    else:
        preds = predict(model, [evaluation.images], device)
    labels = np.asarray(evaluation.labels)
    score = top1(preds, labels)
    if config["phase"] == "select":
        curve.val(recipe.steps, score)
    tune.report({"step": recipe.steps, "top1": score, "eval_images": len(labels),
                 "diverged": False, "task": task.name, "started_at": started_at,
                 "finished_at": time.time(), "curve": curve.to_json(), **stats})


@dataclass
class Curve:
    """A trial's fine-tuning over steps, for its MLflow run: the (smoothed) loss and the
    learning rate at about `POINTS` steps, and the val200 top-1 at each Tune report (the
    selection phase). Kept in the trial's record, as JSON, and logged by the driver."""

    POINTS = 50
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_top1: list[float] = field(default_factory=list)

    def every(self, steps: int) -> int:
        return max(1, steps // self.POINTS)

    def add(self, step: int, loss: float, lr: float) -> None:
        self.step.append(step)
        self.loss.append(float(loss))
        self.lr.append(float(lr))

    def val(self, step: int, top1: float) -> None:
        self.val_step.append(step)
        self.val_top1.append(float(top1))

    def to_json(self) -> str:
        """A string: Tune's loggers take a result's strings as they are."""
        import json

        return json.dumps({"step": self.step, "loss": self.loss, "lr": self.lr,
                           "val_step": self.val_step, "val_top1": self.val_top1})
