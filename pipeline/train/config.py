"""The pretraining run configuration: typed, frozen dataclasses, named presets, `--set` overrides
(the machinery, shared with the VTAB evaluation: pipeline/config.py).

    cfg = apply_overrides(PRESETS["smoke"](), ["optim.lr=3e-4", "train.total_steps=200"])

Steps are the unit of everything (schedule, logging, few-shot probe, checkpoints). The global
batch is what you configure; the per-worker batch and gradient accumulation are derived from
the number of workers (`TrainConfig.micro_batch_size` caps what one worker runs at once).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pipeline import config
from pipeline.architecture import ViTConfig
from pipeline.config import Sectioned
from pipeline.data.config import LEVELS, DataConfig
from pipeline.train.checkpoints import CheckpointConfig
from pipeline.train.fewshot import ProbeConfig


@dataclass(frozen=True)
class OptimConfig:
    """Adam (β1 0.9, β2 0.999) with decoupled weight decay, linear warmup, then linear or
    cosine decay; global-norm clipping (paper §4.1, Table 3)."""

    lr: float = 1e-3
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 10_000
    decay: Literal["linear", "cosine"] = "linear"
    end_lr: float = 1e-5           # where linear decay ends (vit_jax `linear_end`)
    grad_clip: float = 1.0         # global norm; 0 disables

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.decay not in ("linear", "cosine"):
            raise ValueError(f"optim.decay must be 'linear' or 'cosine', got {self.decay!r}")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 100_000
    global_batch_size: int = 4096
    micro_batch_size: int = 0      # per-worker forward batch; 0: global / workers (no accum)
    objective: Literal["softmax", "sigmoid", "mpp"] = "softmax"
    # Initial bias of the classifier (the weights start at zero). With sigmoid cross-entropy
    # over thousands of classes, 0 makes the first loss K * log 2 (15,140 for i21k) and its
    # gradient huge; big_vision starts at -10 (`init_head_bias`, configs/vit_i21k.py), so
    # every class begins near p = 4.5e-5 and the first loss is about 11.0 for i21k: 10.0 for
    # the true class, -log sigmoid(-10), plus 21,842 x log(1 + e^-10) = 0.99 for the others.
    head_bias: float = 0.0
    seed: int = 0
    log_every: int = 50
    # MLflow system metrics (CPU, memory, disk, network, GPU) of every node, sampled every so
    # many seconds into the run as system/node_<i>/... (0: off).
    system_metrics_s: float = 10.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast on GPU
    # ddp | fsdp (FSDP2, sharded over all workers) | hsdp (sharded within groups of
    # shard_group_size workers, replicated across them); auto: FSDP for L and H on GPUs.
    parallel: Literal["auto", "ddp", "fsdp", "hsdp"] = "auto"
    shard_group_size: int = 0      # hsdp: workers per shard group (0: the workers of a node)
    compile: Literal["auto", "on", "off"] = "auto"        # auto: torch.compile on GPU only
    # Worker-group restarts (a crashed worker, a lost node) before the run gives up; node
    # preemptions are counted apart and retried without limit. A multi-week run on hundreds
    # of GPUs sees several failures a week, so the default leaves room for them.
    max_failures: int = 20

    def __post_init__(self):
        for name in ("total_steps", "global_batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.shard_group_size < 0:
            raise ValueError("train.shard_group_size must be >= 0")
        if self.objective not in ("softmax", "sigmoid", "mpp"):
            raise ValueError(f"train.objective must be softmax, sigmoid or mpp, got "
                             f"{self.objective!r}")


@dataclass(frozen=True)
class ScaleConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Where the workers (plus one data task) do not fit the cluster: stop at once when it
    # cannot grow (a local Ray, no autoscaler); with an autoscaler, wait this long for it.
    wait_for_resources_s: float = 600.0

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"scale.num_workers must be >= 1, got {self.num_workers}")
        if self.wait_for_resources_s < 0:
            raise ValueError("scale.wait_for_resources_s must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    name: str = "vit"              # stable: the same name resumes the same run
    experiment: str = "vit-pretrain"
    storage: str = ""              # local folder or s3://bucket/prefix; "" -> ~/vit-runs
    # A local `storage` folder that every node of a multi-node cluster mounts (NFS, Lustre):
    # without it, a multi-node run refuses a local folder (each node would see its own).
    shared_storage: bool = False
    # The MLflow registered model the run's checkpoints become versions of; "" -> the one of
    # the experiment (its name), so that the runs of an experiment are versions side by side.
    registered_model: str = ""

    def __post_init__(self):
        # The name is a folder under `storage` (and an S3 key part): it must stay inside it.
        if not RUN_NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(f"run.name {self.name!r}: use letters, digits, '.', '_' and '-' "
                             f"(no '/' or '..'; it names a folder under the storage), e.g. "
                             f"--name vit-b16-lr3e-4")
        if any(c in self.registered_model for c in "/:"):
            raise ValueError(f"run.registered_model {self.registered_model!r}: MLflow model "
                             f"names cannot hold '/' or ':'; e.g. vit-b16-i21k")


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class EvalConfig:
    """VTAB-1k evaluations that the pretraining command starts itself, as `vit-vtab` runs them
    (Ray Tune trials on the same cluster): of the final checkpoint (`at_end`) and of every
    `vtab_every`-th checkpoint. The handoff is jobs/pretrain.py's and eval/handoff.py's (this
    package never imports eval); the names below are checked there, before Ray starts."""

    at_end: bool = False
    vtab_every: int = 0                 # every N-th checkpoint written too (by count); 0: none
    protocol: str = "linear"            # a vit-vtab preset: linear (fast), vit, per-task, ...
    tasks: tuple[str, ...] = ("all",)   # task names or groups, as vit-vtab --tasks
    data: str = ""                      # the VTAB-1k root; "": $VTAB_DATA or ~/vtab-1k
    test_images: int = 2000             # protocol linear: test images scored per task
    resolution: int = 0                 # 0: the protocol's (linear 224, the others 384)

    def __post_init__(self):
        if self.vtab_every < 0 or self.test_images < 0 or self.resolution < 0:
            raise ValueError("eval.vtab_every, eval.test_images and eval.resolution must be "
                             ">= 0 (0: off, all, the protocol's)")

    @property
    def enabled(self) -> bool:
        return self.at_end or self.vtab_every > 0


@dataclass(frozen=True)
class PretrainConfig(Sectioned):
    model: ViTConfig = field(default_factory=ViTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="synthetic"))
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # The spellings of earlier releases (their config.json, their --set keys) -> the keys now.
    ALIASES: ClassVar[dict[str, str]] = {
        "train.checkpoint_every": "checkpoint.every",
        "train.checkpoint_minutes": "checkpoint.minutes",
        "train.checkpoint_async": "checkpoint.asynchronous",
        "train.keep_checkpoints": "checkpoint.keep",
        "data.fewshot_sets": "probe.sets", "data.fewshot_split": "probe.split",
        "data.fewshot_shots": "probe.shots", "data.fewshot_images": "probe.images",
        "train.fewshot_every": "probe.every"}

    def __post_init__(self):
        t, s = self.train, self.scale
        if t.global_batch_size % s.num_workers:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible "
                             f"by scale.num_workers={s.num_workers}")
        per_worker = t.global_batch_size // s.num_workers
        if t.micro_batch_size and per_worker % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible "
                             f"by scale.num_workers x train.micro_batch_size "
                             f"({s.num_workers} x {t.micro_batch_size})")
        if t.parallel == "hsdp" and t.shard_group_size and s.num_workers % t.shard_group_size:
            raise ValueError(f"train.shard_group_size={t.shard_group_size} does not divide "
                             f"scale.num_workers={s.num_workers}")
        if t.objective == "mpp" and self.model.pool != "token":
            raise ValueError("masked patch prediction needs model.pool='token'")
        if t.objective == "mpp" and self.data.mixup:
            raise ValueError("data.mixup mixes class targets; masked patch prediction has "
                             "none: set data.mixup=0")
        if self.optim.warmup_steps >= t.total_steps and t.total_steps > 1:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be below "
                             f"train.total_steps={t.total_steps}")

    def compile_enabled(self, gpu: bool) -> bool:
        return self.train.compile == "on" or (self.train.compile == "auto" and gpu)

    @property
    def batch_augment(self):
        """The device-side augmentation (RandAugment, Mixup) of this run."""
        from pipeline.data.augreg import BatchAugment

        d = self.data
        return BatchAugment(d.randaug_layers, d.randaug_magnitude, d.mixup)

    @property
    def per_worker_batch(self) -> int:
        return self.train.global_batch_size // self.scale.num_workers

    @property
    def micro_batch(self) -> int:
        return self.train.micro_batch_size or self.per_worker_batch

    @property
    def accumulation_steps(self) -> int:
        return self.per_worker_batch // self.micro_batch


def apply_overrides(cfg: PretrainConfig, items: list[str]) -> PretrainConfig:
    """Apply `section.field=value` overrides (pipeline.config); unknown keys and wrong types
    are errors. `model.variant=B/16` (or a hybrid, `R50+B/16`) sets all of the model's sizes
    at once."""
    return config.apply_overrides(cfg, items, setters={"model.variant": _set_variant})


def _set_variant(model: ViTConfig, variant: str) -> ViTConfig:
    sizes = ViTConfig.from_variant(variant)
    return model.replace(**{k: getattr(sizes, k) for k in (
        "patch_size", "hidden_size", "depth", "num_heads", "mlp_dim", "resnet_layers",
        "resnet_width")})


# ---------------------------------------------------------------------------------------------
# Presets: the paper's Table 3 rows, masked patch prediction, and a smoke run
# ---------------------------------------------------------------------------------------------
def smoke() -> PretrainConfig:
    """A tiny ViT on the synthetic source, on CPU: the whole machinery in about 25 s on 2
    cores (~3 s of it training, the rest starting and stopping Ray: bench/startup.py).
    Its head is the class token's linear classifier without a pre-logits layer (as the AugReg
    models), so it exports to both transformers and timm (`jobs/export.py`).

        python jobs/pretrain.py --preset smoke
    Expected (2-core CPU, 1 worker): the loss falls from log(10) = 2.30 to about 0.4 in 150
    steps; few-shot accuracy reaches 1.0.
    """
    return PretrainConfig(
        model=ViTConfig(patch_size=8, hidden_size=64, depth=2, num_heads=2, mlp_dim=128,
                        image_size=32, num_classes=10),
        optim=OptimConfig(lr=2e-3, weight_decay=0.03, warmup_steps=15, decay="cosine"),
        data=DataConfig(source="synthetic", augment="resize", synthetic_samples=2048,
                        synthetic_classes=10, shuffle_buffer=256),
        train=TrainConfig(total_steps=150, global_batch_size=64, log_every=25),
        run=RunConfig(name="smoke", experiment="vit-smoke"),
        checkpoint=CheckpointConfig(every=50, keep=2),
        probe=ProbeConfig(every=50, shots=(1, 5)))


def smoke_hybrid() -> PretrainConfig:
    """The smoke run with a tiny hybrid (§3.1): a two-stage ResNet (1 unit each, root width
    32) whose /8 feature map of the 32 px images is embedded with 1 x 1 patches (a 4 x 4
    grid), then the same 2-layer encoder. CPU, about a minute.

        python jobs/pretrain.py --preset smoke_hybrid
    Expected (2-core CPU): the loss falls from log(10) = 2.30 to about 0.7 in 150 steps and
    5-shot accuracy reaches about 0.8 (its units start as their shortcuts, gn3 at 0).
    """
    cfg = smoke()
    return dataclasses.replace(
        cfg, model=cfg.model.replace(patch_size=1, resnet_layers=(1, 1), resnet_width=32),
        run=dataclasses.replace(cfg.run, name="smoke-hybrid"))


def _table3(variant: str, lr: float, wd: float, dropout: float, steps: int, data: str,
            name: str, decay: str = "linear") -> PretrainConfig:
    """Table 3's recipe: Adam, batch 4096, 10k warmup, linear decay, resolution 224.

    Both sets train with sigmoid cross-entropy and the classifier bias at -10. The ViT paper
    does not state its loss; JFT is multi-label, and the authors' ImageNet-21k config trains
    so (big_vision `configs/vit_i21k.py`: `loss='sigmoid_xent'`, `init_head_bias=-10`), but
    that config is the 2021 AugReg recipe (300 epochs, RandAugment and Mixup), not the one the
    2020 checkpoints were trained with. Gradient clipping at global norm 1 for ImageNet-21k
    comes from the same config (`grad_clip_norm=1.0`); Table 3's note adds clipping "for
    ImageNet", i.e. the ImageNet-1k rows, and says nothing of ImageNet-21k or JFT. So the i21k
    presets clip and the JFT ones do not."""
    return PretrainConfig(
        model=ViTConfig.from_variant(variant, num_classes=21843 if data == "i21k" else 18291,
                                     representation_size=ViTConfig.from_variant(
                                         variant).hidden_size, dropout=dropout),
        optim=OptimConfig(lr=lr, weight_decay=wd, warmup_steps=10_000, decay=decay,
                          grad_clip=1.0 if data == "i21k" else 0.0),
        data=DataConfig(source="shards", uri=f"s3://CHANGE-ME/{data}", augment="inception"),
        train=TrainConfig(total_steps=steps, global_batch_size=4096, objective="sigmoid",
                          head_bias=-10.0),
        scale=ScaleConfig(num_workers=8, use_gpu=True, cpus_per_worker=8),
        run=RunConfig(name=name, experiment="vit-pretrain"),
        checkpoint=CheckpointConfig(every=2000),
        probe=ProbeConfig(every=5000))


# ImageNet-21k: 14.2M images; 90 epochs at batch 4096 = ~312k steps (30 epochs: ~104k).
I21K_STEPS_PER_EPOCH = 14_197_122 // 4096
# JFT-300M: 7 epochs at batch 4096 = ~517k steps; 14 epochs ~1.03M.
JFT_STEPS_PER_EPOCH = 303_000_000 // 4096


def vit_b16_i21k() -> PretrainConfig:
    """ViT-B/16 on ImageNet-21k (Table 3): 90 epochs, lr 1e-3, wd 0.03, dropout 0.1;
    sigmoid cross-entropy, classifier bias -10, clipping at 1 (big_vision's, see `_table3`).

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_b16_i21k \\
            --set data.uri=s3://bucket/imagenet21k --workers 64 --gpus-per-worker 1
    About 312k steps; ~85 H100-hours at 45% MFU (`pipeline.perf.accelerator_hours`).
    """
    return _table3("B/16", 1e-3, 0.03, 0.1, 90 * I21K_STEPS_PER_EPOCH, "i21k", "vit-b16-i21k")


def vit_r50_b16_i21k() -> PretrainConfig:
    """R50+ViT-B/16 on ImageNet-21k, the hybrid of §3.1 and Table 6: ResNet-50 (stage 4's
    units moved to stage 3, (3, 4, 9)) whose /16 feature map is embedded with 1 x 1 patches,
    then ViT-B; Table 3's ImageNet-21k recipe for B (90 epochs, lr 1e-3, wd 0.03, dropout
    0.1 as vit_jax's `get_r50_b16_config`), the data of the released `R50+ViT-B_16.npz`.

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_r50_b16_i21k \\
            --set data.uri=s3://bucket/imagenet21k --workers 64 --gpus-per-worker 1
    About 312k steps; ~103 H100-hours at 45% MFU (`pipeline.perf.accelerator_hours`);
    convolutions rarely reach the MFU of the encoder's matmuls, so expect more.
    """
    return _table3("R50+B/16", 1e-3, 0.03, 0.1, 90 * I21K_STEPS_PER_EPOCH, "i21k",
                   "vit-r50-b16-i21k")


def vit_l16_i21k() -> PretrainConfig:
    """ViT-L/16 on ImageNet-21k (Table 3): 90 epochs (30 also in the paper), lr 1e-3,
    wd 0.03, dropout 0.1; FSDP.

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_l16_i21k \
            --set data.uri=s3://bucket/imagenet21k --workers 128 --gpus-per-worker 1
    About 312k steps; ~295 H100-hours at 45% MFU."""
    return _table3("L/16", 1e-3, 0.03, 0.1, 90 * I21K_STEPS_PER_EPOCH, "i21k", "vit-l16-i21k")


def vit_b16_jft() -> PretrainConfig:
    """ViT-B/16 on JFT-300M (Table 3): 7 epochs, lr 8e-4, wd 0.1, no dropout, sigmoid loss
    (JFT is multi-label).

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_b16_jft \
            --set data.uri=s3://bucket/jft300m --workers 128 --gpus-per-worker 1
    About 517k steps; ~140 H100-hours at 45% MFU."""
    return _table3("B/16", 8e-4, 0.1, 0.0, 7 * JFT_STEPS_PER_EPOCH, "jft", "vit-b16-jft")


def vit_h14_jft() -> PretrainConfig:
    """ViT-H/14 on JFT-300M (Table 3): 14 epochs, lr 3e-4, wd 0.1; FSDP.

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_h14_jft \
            --set data.uri=s3://bucket/jft300m --workers 512 --gpus-per-worker 1
    About 1.03M steps; ~2.7k H100-hours at 45% MFU (the paper: 2.5k TPUv3-core-days)."""
    return _table3("H/14", 3e-4, 0.1, 0.0, 14 * JFT_STEPS_PER_EPOCH, "jft", "vit-h14-jft")


def vit_b16_mpp() -> PretrainConfig:
    """ViT-B/16 masked patch prediction (App. B.1.2): corrupt 50% of patch embeddings
    (80% [mask], 10% random other patch, 10% kept), predict the 3-bit mean colour (512
    classes) of each; 1M steps at batch 4096 on JFT, Adam lr 2e-4, 10k warmup, cosine.

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_b16_mpp \
            --set data.uri=s3://bucket/jft300m --workers 128 --gpus-per-worker 1
    The paper reports 79.9% ImageNet top-1 after fine-tuning; ~270 H100-hours at 45% MFU."""
    cfg = _table3("B/16", 2e-4, 0.1, 0.0, 1_000_000, "jft", "vit-b16-mpp", decay="cosine")
    return dataclasses.replace(
        cfg, model=cfg.model.replace(num_classes=0, representation_size=None),
        train=dataclasses.replace(cfg.train, objective="mpp"))


def _augreg(variant: str, setting: str, wd: float, name: str) -> PretrainConfig:
    """The AugReg paper's ImageNet-21k recipe (Steiner et al., 2021; big_vision
    `configs/vit_i21k.py`): 300 epochs at batch 4096; Adam, lr 1e-3, 10k warmup, cosine decay
    to 0, clipping at global norm 1; sigmoid cross-entropy, head bias -10; Inception crop and
    flip, then the named `setting`'s RandAugment and Mixup (data.config.LEVELS); dropout and
    stochastic depth 0; the class-token head without a pre-logits layer (vit_jax's AugReg
    models). Each preset's setting and weight decay are those of the released checkpoint
    vit_jax recommends for the size (best ImageNet-21k validation accuracy of the sweep,
    README "Available ViT models"), e.g. `B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-
    sd_0.0`. Weight decay is AdamW's (decay lr x wd per step): the paper's wd 0.1 is big_vision's
    `wd=1e-4`, which its optimizer does not multiply by the base lr."""
    layers, magnitude, p = LEVELS[setting]
    return PretrainConfig(
        model=ViTConfig.from_variant(variant, num_classes=21843),
        optim=OptimConfig(lr=1e-3, weight_decay=wd, warmup_steps=10_000, decay="cosine",
                          grad_clip=1.0),
        data=DataConfig(source="shards", uri="s3://CHANGE-ME/i21k", augment="inception",
                        randaug_layers=layers, randaug_magnitude=magnitude, mixup=p),
        train=TrainConfig(total_steps=300 * I21K_STEPS_PER_EPOCH, global_batch_size=4096,
                          objective="sigmoid", head_bias=-10.0),
        scale=ScaleConfig(num_workers=8, use_gpu=True, cpus_per_worker=8),
        run=RunConfig(name=name, experiment="vit-pretrain"),
        checkpoint=CheckpointConfig(every=2000),
        probe=ProbeConfig(every=5000))


def vit_s16_i21k_augreg() -> PretrainConfig:
    """ViT-S/16 on ImageNet-21k, AugReg (`_augreg`): 300 epochs, "light1" (RandAugment(2, 0),
    no Mixup), wd 0.03. The released checkpoint reaches 83.73% on ImageNet after fine-tuning
    at 384 px (vit_jax README).

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_s16_i21k_augreg \
            --set data.uri=s3://bucket/imagenet21k --workers 16 --gpus-per-worker 1
    About 1.04M steps; ~75 H100-hours at 45% MFU."""
    return _augreg("S/16", "light1", 0.03, "vit-s16-i21k-augreg")


def vit_b16_i21k_augreg() -> PretrainConfig:
    """ViT-B/16 on ImageNet-21k, AugReg (`_augreg`): 300 epochs, "medium1" (RandAugment(2, 15),
    Mixup p 0.2), wd 0.1. The released checkpoint reaches 85.49% on ImageNet after
    fine-tuning at 384 px (vit_jax README).

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_b16_i21k_augreg \
            --set data.uri=s3://bucket/imagenet21k --workers 64 --gpus-per-worker 1
    About 1.04M steps; ~280 H100-hours at 45% MFU."""
    return _augreg("B/16", "medium1", 0.1, "vit-b16-i21k-augreg")


def vit_l16_i21k_augreg() -> PretrainConfig:
    """ViT-L/16 on ImageNet-21k, AugReg (`_augreg`): 300 epochs, "strong1" (RandAugment(2, 20),
    Mixup p 0.5), wd 0.1; FSDP. The released checkpoint reaches 85.59% on ImageNet after
    fine-tuning at 384 px (vit_jax README).

        ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_l16_i21k_augreg \
            --set data.uri=s3://bucket/imagenet21k --workers 128 --gpus-per-worker 1
    About 1.04M steps; ~980 H100-hours at 45% MFU."""
    return _augreg("L/16", "strong1", 0.1, "vit-l16-i21k-augreg")


PRESETS = {f.__name__: f for f in (smoke, smoke_hybrid, vit_b16_i21k, vit_r50_b16_i21k,
                                   vit_l16_i21k, vit_b16_jft, vit_h14_jft, vit_b16_mpp,
                                   vit_s16_i21k_augreg, vit_b16_i21k_augreg,
                                   vit_l16_i21k_augreg)}
