"""The 19 VTAB-1k tasks as one table (Zhai et al. 2019; BiT Supp. F; ViT Table 9).

Each row: the task's folder name in the VTAB-1k on-disk layout, its group, its number of
classes, the size of its `test` split, and BiT Supp. F's augmentation exceptions (no random
horizontal flip for dSprites-location/orientation and SmallNORB-azimuth; no random crop for
Clevr-count/distance, DMLab, KITTI-distance and dSprites-location). Plus the reference
numbers of ViT Table 9, keyed by the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUPS = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class Task:
    name: str            # folder name in the VTAB-1k layout (NOAH / SSF / FacT)
    group: str
    num_classes: int
    test_size: int
    source: str          # the task_adaptation definition it comes from
    flip: bool = True    # random horizontal flip while fine-tuning
    crop: bool = True    # random crop while fine-tuning


TASKS: tuple[Task, ...] = (
    Task("caltech101", "natural", 102, 6084, "caltech101"),
    Task("cifar", "natural", 100, 10000, "cifar(num_classes=100)"),
    Task("dtd", "natural", 47, 1880, "dtd"),
    Task("oxford_flowers102", "natural", 102, 6149, "oxford_flowers102"),
    Task("oxford_iiit_pet", "natural", 37, 3669, "oxford_iiit_pet"),
    Task("svhn", "natural", 10, 26032, "svhn"),
    Task("sun397", "natural", 397, 21750, "sun397"),
    Task("patch_camelyon", "specialized", 2, 32768, "patch_camelyon"),
    Task("eurosat", "specialized", 10, 5400, "eurosat"),
    Task("resisc45", "specialized", 45, 6300, "resisc45"),
    Task("diabetic_retinopathy", "specialized", 5, 42670,
         'diabetic_retinopathy(config="btgraham-300")'),
    Task("clevr_count", "structured", 8, 15000, 'clevr(task="count_all")', crop=False),
    Task("clevr_dist", "structured", 6, 15000, 'clevr(task="closest_object_distance")',
         crop=False),
    Task("dmlab", "structured", 6, 22735, "dmlab", crop=False),
    Task("kitti", "structured", 4, 711, 'kitti(task="closest_vehicle_distance")', crop=False),
    Task("dsprites_loc", "structured", 16, 73728,
         'dsprites(predicted_attribute="label_x_position",num_classes=16)', flip=False,
         crop=False),
    Task("dsprites_ori", "structured", 16, 73728,
         'dsprites(predicted_attribute="label_orientation",num_classes=16)', flip=False),
    Task("smallnorb_azi", "structured", 18, 12150,
         'smallnorb(predicted_attribute="label_azimuth")', flip=False),
    Task("smallnorb_ele", "structured", 9, 12150,
         'smallnorb(predicted_attribute="label_elevation")'),
)
BY_NAME = {t.name: t for t in TASKS}

# ViT Table 9 (App. D.10): VTAB-1k top-1 (%) at 384 px, 2500 steps, lr 0.01.
REFERENCE = {
    "vit-h14-jft": dict(caltech101=95.3, cifar=85.5, dtd=75.2, oxford_flowers102=99.7,
                        oxford_iiit_pet=97.2, sun397=65.0, svhn=88.9, patch_camelyon=83.3,
                        eurosat=96.7, resisc45=91.4, diabetic_retinopathy=76.6, clevr_count=91.7,
                        clevr_dist=63.8, dmlab=53.1, dsprites_loc=79.4, dsprites_ori=63.3,
                        kitti=84.5, smallnorb_azi=33.2, smallnorb_ele=51.2),
    "vit-l16-jft": dict(caltech101=95.4, cifar=81.9, dtd=74.3, oxford_flowers102=99.7,
                        oxford_iiit_pet=96.7, sun397=63.5, svhn=87.4, patch_camelyon=83.6,
                        eurosat=96.5, resisc45=89.7, diabetic_retinopathy=77.1, clevr_count=86.4,
                        clevr_dist=63.1, dmlab=49.7, dsprites_loc=74.5, dsprites_ori=60.5,
                        kitti=82.2, smallnorb_azi=36.2, smallnorb_ele=51.1),
    "vit-l16-i21k": dict(caltech101=90.8, cifar=84.1, dtd=74.1, oxford_flowers102=99.3,
                         oxford_iiit_pet=92.7, sun397=61.0, svhn=80.9, patch_camelyon=82.5,
                         eurosat=95.6, resisc45=85.2, diabetic_retinopathy=75.3,
                         clevr_count=70.3, clevr_dist=56.1, dmlab=41.9, dsprites_loc=74.7,
                         dsprites_ori=64.9, kitti=79.9, smallnorb_azi=30.5, smallnorb_ele=41.7),
}


def select(spec: str) -> list[Task]:
    """`all`, a group name, or comma-separated task names -> tasks, in table order."""
    spec = spec.strip()
    if spec == "all":
        return list(TASKS)
    if spec in GROUPS:
        return [t for t in TASKS if t.group == spec]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown VTAB task(s) {unknown}; use all, natural, specialized, "
                         f"structured or names from: {', '.join(BY_NAME)}")
    return [t for t in TASKS if t.name in names]


def summarize(top1: dict[str, float]) -> dict[str, float]:
    """Per-group means, the mean over the tasks (the paper's "Mean"), and the mean of the
    group means (what parameter-efficient-tuning papers report), over the tasks given."""
    out = {}
    for g in GROUPS:
        vals = [v for k, v in top1.items() if BY_NAME[k].group == g]
        if vals:
            out[g] = sum(vals) / len(vals)
    out["mean"] = sum(top1.values()) / len(top1)
    groups = [out[g] for g in GROUPS if g in out]
    out["mean_of_groups"] = sum(groups) / len(groups)
    return out
