"""Few-shot linear probe (ViT paper §4.1), ported from big_vision's `fewshot_lsr` evaluator
(`big_vision/evaluators/fewshot_lsr.py`, with `configs/common_fewshot.py`'s settings): the
pre-logits of frozen images, k labelled images per class of a downstream set drawn with a
seed, a closed-form L2-regularised least-squares map to {-1, 1}^K targets, top-1 on the set's
test split, the mean over seeds. Cheap enough to run during pretraining as a progress signal.

As big_vision does it:
- features: the pre-logits (the tanh representation layer's output where the model has one,
  else the pooled token), `Pretrainer.forward(images)`;
- each dimension standardised with the mean and std of the k-shot training images (std + 1e-5),
  the test images with the same statistics;
- a constant feature of 100 appended as the bias (so large it is almost unregularised);
- targets 2 * one_hot(label, K) - 1 over all K classes of the set; l2 = 2^10;
- per seed, each class's images permuted by `np.random.default_rng(seed)` and its first k
  taken (a class with fewer gives what it has); 3 seeds, each logged
  (`fewshot/<set>/<k>shot/seed<i>`, as big_vision logs `<set>_<k>shot-seed-<i>`), and their
  mean (`fewshot/<set>/<k>shot`);
- k in (1, 5, 10, 25), `configs/common_fewshot.py`'s `shots`.
The solve is big_vision's eigendecomposition of the smaller Gram matrix, in float64
(`pipeline.ridge.Ridge`, shared with VTAB-1k's `linear` protocol); the tests compare it with a
transcription of big_vision's.

Where big_vision holds the representations of a set's whole train split, the probe holds
images (it recomputes their features at every probe) and so bounds them: the training pool is
each class's first max(shots) images in the split's order (a k-shot draw permutes those, not
the whole class: big_vision's draws exactly where no class has more), at most
`probe.pool_images`; the test set is the test split's first `probe.images`. 10,000 pool
images cover 25 shots of 400 classes (SUN397 has 397); at 224 px that is 1.5 GB of uint8 per
set, held on the driver and once per node in the object store, and 10,000 forward passes per
probe, split over the workers. Where the cap stops a set short of max(shots) images of every
class, a warning says how short.

The probe is one evaluator unit, as big_vision's are: `FewShotProbe.build(cfg, manifest)` on the
driver loads its downstream sets (`ProbeConfig`, the `probe` section of the run config); the
driver ships the object to the workers through the object store, and the loop calls
`probe.run(model, env)` at the steps `probe.due(step)` names. The loop knows nothing of its
data, features or maths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.transforms import to_model_input

if TYPE_CHECKING:      # torch where it is used: the driver builds the probe without it
    import torch

    from pipeline.train.config import PretrainConfig
    from pipeline.train.loop import WorkerEnv

log = logging.getLogger("pipeline.train")

L2_REG = 2.0**10
SEEDS = 3


def shot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """big_vision's draw: per class, a permutation by `default_rng(seed)` (drawn for every
    class in order, so the draw of one class does not depend on `shots`), its first `shots`."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.where(labels == c)[0]) for c in range(num_classes)]
    return np.concatenate([idx[:shots] for idx in per_class]).astype(np.int64)


def fewshot_accuracy(train_feats: torch.Tensor, train_labels: np.ndarray,
                     test_feats: torch.Tensor, test_labels: np.ndarray, num_classes: int,
                     shots: int, seeds: int = SEEDS, l2: float = L2_REG) -> float:
    """Mean top-1 over `seeds` draws of `shots` training images per class. NaN when the
    training pool or the test set is empty."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if not len(train_labels) or not len(test_labels):
        return float("nan")
    return float(np.mean([seed_accuracy(train_feats, train_labels, test_feats, test_labels,
                                        num_classes, shots, seed, l2)
                          for seed in range(seeds)]))


def seed_accuracy(train_feats: torch.Tensor, train_labels: np.ndarray, test_feats: torch.Tensor,
                  test_labels: np.ndarray, num_classes: int, shots: int, seed: int,
                  l2: float = L2_REG) -> float:
    """Top-1 of one draw (`shot_indices` with `seed`)."""
    from pipeline.ridge import Ridge

    idx = shot_indices(np.asarray(train_labels), num_classes, shots, seed)
    pred = Ridge(train_feats[idx], np.asarray(train_labels)[idx], num_classes).predict(
        test_feats, l2)
    return float((pred.numpy() == np.asarray(test_labels)).mean())


# ---------------------------------------------------------------------------------------------
# The evaluator unit: its config, its data, its features, its metrics
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeConfig:
    """The few-shot probe during pretraining (the run config's `probe` section; before it,
    `data.fewshot_*` and `train.fewshot_every`, which still load and still `--set`)."""

    every: int = 0                 # steps between probes, at log steps (0: off)
    # Downstream sets, "name=URI" each: shards with train(800val200) and test/val splits, or a
    # local VTAB-1k task folder; logged as fewshot/<name>/<k>shot. None given: the synthetic
    # set for the synthetic source, else `split` of the pretraining data, read into a train
    # pool and a test set (`probe_data.load_split_pool`).
    sets: tuple[str, ...] = ()
    split: str = "val"             # the fallback's split of the pretraining data ("": off)
    shots: tuple[int, ...] = (1, 5, 10, 25)      # big_vision configs/common_fewshot.py
    # The training pool of a set: each class's first max(shots) images, at most this many in
    # all (memory: S * S * 3 bytes an image; 1.5 GB at 224 px).
    pool_images: int = 10_000
    images: int = 1000             # at most this many test images per set

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"probe.every must be >= 0 (0: off), got {self.every}")
        for entry in self.sets:
            name, sep, uri = entry.partition("=")
            if not sep or not name or not uri:
                raise ValueError(f"probe.sets entry {entry!r}: write name=URI (shards or a "
                                 f"VTAB-1k task folder)")
        if not self.shots or any(k < 1 for k in self.shots):
            raise ValueError(f"probe.shots must be positive, got {list(self.shots)}")
        if self.images < 1 or self.pool_images < 1:
            raise ValueError(f"probe.images and probe.pool_images must be positive, got "
                             f"{self.images} and {self.pool_images}")


@dataclass(frozen=True)
class ProbeSet:
    """One downstream set: uint8 images (n, S, S, 3) at the model's resolution, int labels."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


class FewShotProbe:
    """big_vision's `fewshot_lsr` evaluator as one object: built on the driver with its sets
    (`build`), pickled once into the object store, run on every worker (`run`: a collective,
    since the features come through the possibly sharded model)."""

    def __init__(self, sets: list[ProbeSet], shots: tuple[int, ...], every: int,
                 total_steps: int, input_mean, input_std):
        self.sets, self.shots, self.every = sets, tuple(shots), every
        self.total_steps = total_steps
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)

    @classmethod
    def build(cls, cfg: PretrainConfig, manifest: dict | None) -> FewShotProbe | None:
        """The probe of a run (None when it is off or has no set with images)."""
        p = cfg.probe
        if not p.every:
            return None
        sets = load_sets(cfg, manifest)
        if not sets:
            return None
        return cls(sets, p.shots, p.every, cfg.train.total_steps, cfg.model.input_mean,
                   cfg.model.input_std)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def run(self, model, env: WorkerEnv) -> dict:
        """Every worker computes pre-logits for its part of the images, rank 0 fits and scores
        -> {"fewshot/<set>/<k>shot": mean top-1 over the seeds, "fewshot/<set>/<k>shot/seed<i>":
        each seed's} on rank 0, {} on the others."""
        out = {}
        for s in self.sets:
            train = self.features(model, s.train_images, env)
            test = self.features(model, s.test_images, env)
            if train is None:
                continue
            for k in self.shots:
                accs = [seed_accuracy(train, s.train_labels, test, s.test_labels,
                                      s.num_classes, k, seed) for seed in range(SEEDS)]
                out[f"fewshot/{s.name}/{k}shot"] = float(np.mean(accs))
                out |= {f"fewshot/{s.name}/{k}shot/seed{i}": a for i, a in enumerate(accs)}
        return out

    def features(self, model, images: np.ndarray, env: WorkerEnv,
                 batch_size: int = 256) -> torch.Tensor | None:
        """Frozen representations of `images` through the wrapped model, the work split over
        the workers (every worker runs the same number of forward passes, as FSDP's
        collectives require). -> all features on rank 0, None elsewhere."""
        import torch

        n = len(images)
        per = -(-n // env.world)
        mine = images[env.rank * per:(env.rank + 1) * per]
        if len(mine) < per:  # pad the last worker's part to the common length
            pad = images[:per - len(mine)] if len(mine) == 0 else mine[-1:].repeat(
                per - len(mine), axis=0)
            mine = np.concatenate([mine, pad]) if len(mine) else pad
        was_training = model.training
        model.eval()
        feats = []
        for i in range(0, per, batch_size):
            x = to_model_input(torch.from_numpy(mine[i:i + batch_size]).to(env.device),
                               self.input_mean, self.input_std)
            # No graph: a forward with grad on leaves FSDP2 waiting for a backward that never
            # comes, and the next training step then differed from DDP's (test_parallel.py).
            with torch.no_grad(), torch.autocast(env.device.type,
                                                 dtype=env.amp or torch.float32,
                                                 enabled=env.amp is not None):
                feats.append(model(x).float())
        model.train(was_training)
        local = torch.cat(feats)                                           # (per, D)
        if env.world > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(local) for _ in range(env.world)]
            dist.all_gather(parts, local.contiguous())
            local = torch.cat(parts)
        return local[:n].cpu() if env.rank == 0 else None


def load_sets(cfg: PretrainConfig, manifest: dict | None) -> list[ProbeSet]:
    """The probe's downstream sets (see `ProbeConfig.sets`), those with images in both
    parts."""
    from pipeline.data import probe as probe_data
    from pipeline.data.synthetic import noise_rows

    p, d, size = cfg.probe, cfg.data, cfg.model.image_size
    per_class = max(p.shots)
    sets = []
    for entry in p.sets:
        name, _, uri = entry.partition("=")
        sets.append(ProbeSet(name=name, **probe_data.load_fewshot_set(
            uri, size, p.images, per_class, p.pool_images)))
    if not sets and d.source == "synthetic":
        n = min(p.images, 50 * d.synthetic_classes)
        part = {}
        for which, base in (("train", 10**9), ("test", 2 * 10**9)):
            rows = noise_rows(np.arange(n) + base, d.synthetic_samples, d.synthetic_classes,
                              size)
            part[f"{which}_images"], part[f"{which}_labels"] = rows["image"], rows["label"]
        sets.append(ProbeSet(name="synthetic", **part, num_classes=d.synthetic_classes))
    elif not sets and p.split and manifest and p.split in manifest["splits"]:
        pool, test = probe_data.load_split_pool(d.uri, p.split, size, per_class,
                                                p.pool_images, p.images)
        log.warning("the few-shot probe draws from %s's %r split (a pool of %d images, the "
                    "next %d its test set); with many classes few have k images. Give "
                    "downstream sets with probe.sets=name=URI,...",
                    d.uri, p.split, len(pool["labels"]), len(test["labels"]))
        sets.append(ProbeSet(name=p.split, train_images=pool["images"],
                             train_labels=pool["labels"], test_images=test["images"],
                             test_labels=test["labels"],
                             num_classes=int(manifest["num_classes"])))
    elif not sets and p.split:
        log.warning("no split %r in %s and no probe.sets: the few-shot probe is off",
                    p.split, d.uri)
    sets = [s for s in sets if len(s.train_labels) and len(s.test_labels)]
    for s in sets:
        short = short_shots(s.train_labels, s.num_classes, p.shots, p.pool_images)
        if short:
            log.warning("few-shot set %s: probe.pool_images=%d stops its pool short: %s. "
                        "Raise probe.pool_images (memory: %d bytes an image)", s.name,
                        p.pool_images, short, size * size * 3)
    return sets


def short_shots(labels: np.ndarray, num_classes: int, shots, pool_images: int) -> str:
    """What a pool cut at `pool_images` cannot give ("" when it was not cut, and so holds
    max(shots) images of every class, or all the split has): the classes it holds, and for
    each k how many of them have fewer than k images."""
    if len(labels) < pool_images:
        return ""
    counts = np.bincount(labels, minlength=num_classes)
    held = counts[counts > 0]
    parts = [f"{int((held < k).sum())} have fewer than {k}" for k in shots if (held < k).any()]
    if len(held) == num_classes and not parts:
        return ""
    return f"it holds {len(held)} of {num_classes} classes" + "".join(f", {p}" for p in parts)
