"""The VTAB-1k evaluation configuration: typed sections, each beside the code that reads it,
composed into `VtabConfig`; named presets; the keys of the flat config before it.

    cfg = pipeline.config.apply_overrides(PRESETS["demo"](), ["finetune.steps=80"])

Sections: `finetune`, the recipe every trial follows (eval/finetune.py); `sweep`, which
trials run and how Ray Tune places them (eval/sweep.py); `data`, where the tasks are
(eval/data.py); `run`, the checkpoint evaluated and the evaluation's name and storage (here).
The machinery (typed `--set section.key=value`, `--config FILE`, `--show-config`) is
pretraining's: pipeline/config.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from eval.data import TaskDataConfig
from eval.recipe import FinetuneConfig
from eval.sweep import PAPER, SweepConfig
from eval.trial import model_label
from pipeline import storage
from pipeline.config import Sectioned

DEFAULT_STORAGE = "~/vit-runs/vtab"


@dataclass(frozen=True)
class VtabRunConfig:
    """What is evaluated, and where the evaluation's trials and reports go."""

    # Ours, Hugging Face (hf://), timm, the authors' .npz, or a pretraining run's folder.
    checkpoint: str = ""
    # None: derived from the checkpoint and the settings (VtabConfig.run_name), so that the
    # same command after an interruption resumes the same evaluation.
    name: str | None = None
    storage: str = DEFAULT_STORAGE          # a folder or s3:// prefix


# Keys that say where and how fast trials run, not what they compute: not part of the name.
PLACEMENT = ("run.name", "run.storage", "sweep.gpus_per_trial", "sweep.cpus_per_trial",
             "sweep.max_concurrent_trials", "sweep.max_failures", "sweep.progress_reports",
             "sweep.wait_for_resources_s")


@dataclass(frozen=True)
class VtabConfig(Sectioned):
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    run: VtabRunConfig = field(default_factory=VtabRunConfig)

    # The flat keys of the evaluation config before it had sections (`vit-vtab
    # --show-config` of releases up to 87df5b9): what their config files hold, what their
    # `--set` took, and what the run name's digest is made of.
    ALIASES: ClassVar[dict[str, str]] = {
        "checkpoint": "run.checkpoint", "data": "data.uri", "tasks": "sweep.tasks",
        "resolution": "finetune.resolution", "lrs": "sweep.lrs", "steps": "finetune.steps",
        "warmup_steps": "finetune.warmup_steps", "batch_size": "finetune.batch_size",
        "micro_batch_size": "finetune.micro_batch_size", "seeds": "sweep.seeds",
        "protocol": "sweep.protocol", "dropout": "finetune.dropout",
        "gpus_per_trial": "sweep.gpus_per_trial", "cpus_per_trial": "sweep.cpus_per_trial",
        "max_concurrent_trials": "sweep.max_concurrent_trials",
        "max_failures": "sweep.max_failures", "name": "run.name", "storage": "run.storage",
        "progress_reports": "sweep.progress_reports"}

    def __post_init__(self):
        s, f = self.sweep, self.finetune
        if s.protocol == "paper" and (tuple(s.lrs), f.steps, s.seeds) != (
                PAPER["lrs"], PAPER["steps"], PAPER["seeds"]):
            raise ValueError("--protocol paper fixes lr 0.01, 2500 steps and 3 seeds (ViT App. "
                             "B.1.1); drop --lrs/--steps/--seeds, or use --protocol vit")

    def changed_recipe(self) -> dict[str, object]:
        """The `finetune` keys that the flat config did not have, where not at their
        default ({"momentum": 0.8}): what names and records add to the old keys."""
        old = {v.partition(".")[2] for v in self.ALIASES.values() if v.startswith("finetune.")}
        default = FinetuneConfig()
        return {f.name: getattr(self.finetune, f.name)
                for f in dataclasses.fields(self.finetune) if f.name not in old and
                getattr(self.finetune, f.name) != getattr(default, f.name)}

    @property
    def run_name(self) -> str:
        """`run.name`, or one derived from the model and a digest of the settings the results
        depend on: the same command finds it again, and resumes. The digest is over the old
        flat keys (so names of earlier releases stay the same) and any key added since that
        is not at its default."""
        if self.run.name:
            return self.run.name
        values = self.flat()
        keys = {old: values[new] for old, new in self.ALIASES.items() if new not in PLACEMENT}
        defaults = type(self)().flat()
        keys |= {k: v for k, v in values.items() if k not in self.ALIASES.values() and
                 k not in PLACEMENT and v != defaults[k]}
        digest = hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]
        return f"vtab-{model_label(self.run.checkpoint)}-{digest}"

    @property
    def root(self) -> str:
        """The evaluation's folder (or s3:// prefix): trials, records and reports."""
        base = self.run.storage if storage.is_s3(self.run.storage) else \
            str(Path(self.run.storage).expanduser().resolve())
        return storage.join(base, self.run_name)


def absolute_paths(cfg: VtabConfig) -> VtabConfig:
    """Local paths made absolute ("~" expanded; the checkpoint resolved), as the config that
    is shown, logged and named: the same command from another folder names the same run."""
    data, checkpoint = cfg.data.uri, cfg.run.checkpoint
    if "://" not in data:
        data = str(Path(data).expanduser())
    if checkpoint and "://" not in checkpoint:
        checkpoint = str(Path(checkpoint).expanduser().resolve())
    return cfg.updated({"data.uri": data, "run.checkpoint": checkpoint})


# ---------------------------------------------------------------------------------------------
# Presets: the ViT paper's protocols (App. B.1.1) and a demo
# ---------------------------------------------------------------------------------------------
def vit() -> VtabConfig:
    """vit-vtab's default: every task fine-tuned on train800 at each of lr 0.001, 0.003,
    0.01, 0.03 (the sweep of vit_jax's AugReg notebook) and scored on val200; the one rate
    best on average over the tasks retrained on train800val200, top-1 on test. 384 px, batch
    512, 2,500 steps, warmup 500, cosine decay. One setting for all tasks, chosen on val200,
    as the ViT paper chose its own (App. B.1.1); the paper's sweep was 2 learning rates x 2
    schedules, and its result is the `paper` preset.

        vit-vtab --checkpoint CKPT --data ROOT
    19 x (4 + 1) = 95 fine-tuning runs: about 28 H100-hours for ViT-B/16 and 98 for L/16 at
    40% MFU (training FLOPs at 384 px, pipeline/perf.py)."""
    return VtabConfig(sweep=SweepConfig(protocol="vit"))


def per_task() -> VtabConfig:
    """The sweep of `vit`, but each task keeps its own best rate on val200 (as the VTAB
    benchmark's authors select hyper-parameters per task).

        vit-vtab --checkpoint CKPT --data ROOT --preset per-task
    The same 95 runs as `vit`: about 28 H100-hours for ViT-B/16 and 98 for L/16 at 40% MFU."""
    return VtabConfig(sweep=SweepConfig(protocol="per-task"))


def paper() -> VtabConfig:
    """As ViT Table 9 was made (App. B.1.1): lr 0.01, 2,500 steps, fine-tuned on
    train800val200, top-1 on test, mean of 3 seeds, no sweep; the default with --reference,
    so that a comparison with the paper is like for like.

        vit-vtab --checkpoint CKPT --data ROOT --reference vit-l16-i21k
    19 x 3 = 57 runs: about 17 H100-hours for ViT-B/16 and 59 for L/16 at 40% MFU."""
    return VtabConfig(sweep=SweepConfig(protocol="paper", lrs=PAPER["lrs"],
                                        seeds=PAPER["seeds"]),
                      finetune=FinetuneConfig(steps=PAPER["steps"]))


def demo() -> VtabConfig:
    """Small and fast, for the demo's tiny checkpoints (jobs/demo.py): the `vit` sweep over
    lr 0.003 and 0.03, 40 steps of batch 32 at 32 px.

        vit-vtab --checkpoint ~/vit-runs/smoke --data ROOT --preset demo --tasks dtd
    Seconds per task on a CPU."""
    return VtabConfig(sweep=SweepConfig(protocol="vit", lrs=(0.003, 0.03)),
                      finetune=FinetuneConfig(steps=40, batch_size=32, resolution=32))


def linear() -> VtabConfig:
    """The fast protocol, for pretraining's own evaluations (`eval.protocol=linear`): no
    fine-tuning, a closed-form linear probe on frozen pre-logits at 224 px, its L2 chosen on
    val200, refit on train800val200, top-1 on each task's first 2,000 test images
    (eval/linear.py).

        vit-vtab --checkpoint CKPT --data ROOT --preset linear
    19 tasks x about 3,000 forward passes: minutes on a GPU for ViT-B/16."""
    return VtabConfig(sweep=SweepConfig(protocol="linear", lrs=(0.01,)),
                      finetune=FinetuneConfig(resolution=224))


PRESETS = {"vit": vit, "per-task": per_task, "paper": paper, "demo": demo,
           "linear": linear}
