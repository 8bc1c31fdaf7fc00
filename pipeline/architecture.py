"""The ViT's architecture as numbers: the variants of the paper's Table 1 (Ti and S from DeiT),
the hybrids' ResNets (§3.1), and `ViTConfig`. No torch here: the command's driver and Ray Train's
controller read and check configurations without loading it; the modules themselves are in
`pipeline.model`, which re-exports all of this."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

# (layers, hidden D, MLP dim, heads): paper Table 1; Ti/S from DeiT.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
}

# Parameters that take no weight decay (besides every bias and norm parameter).
NO_DECAY_NAMES = ("pos_embed", "cls_token")

# Hybrids: (ResNet, effective patch size) -> units per stage (vit_jax `configs/models.py`).
HYBRID_RESNETS: dict[tuple[str, int], tuple[int, ...]] = {
    ("R50", 16): (3, 4, 9),          # stage 4 removed, its units moved to stage 3: a /16 map
    ("R50", 32): (3, 4, 6, 3),       # the ResNet-50: a /32 map
    ("R26", 32): (2, 2, 2, 2),
}
HYBRIDS = sorted(f"{r}+X/{p}" for r, p in HYBRID_RESNETS)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one ViT. `ViTConfig.from_variant("B/16", num_classes=1000)` for the
    paper's sizes; the fields directly for free sizes."""

    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224
    num_channels: int = 3
    num_classes: int = 1000
    # Width of the tanh pre-logits layer of the pre-training head; None: no such layer.
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    # Stochastic depth (Huang et al., 2016; AugReg's "sd"): each residual branch of block i is
    # dropped for a whole sample with probability drop_path * i / (depth - 1), linear from 0
    # at the first block to drop_path at the last (big_vision's schedule, models/mlp_mixer.py).
    drop_path: float = 0.0
    # "token": the class token is the representation (the paper); "gap": mean of all tokens
    # and no class token (big_vision's default, needed to import such checkpoints).
    pool: Literal["token", "gap"] = "token"
    norm_eps: float = 1e-6
    # The input normalisation the weights expect, per channel on [0, 1] pixels:
    # (x / 255 - mean) / std. The authors' models (and ours) take [-1, 1]: mean = std = 0.5.
    # Imports take their source's (a preprocessor or timm pretrained config); fine-tuning, the
    # few-shot probe and the exports honour it.
    input_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    input_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Hybrid: units per stage of the ResNet whose feature map the patch embedding sees (None:
    # a pure ViT, patches of pixels; () the root block alone), and its root width (64: vit_jax's
    # width_factor 1). `patch_size` is then in feature-map cells.
    resnet_layers: tuple[int, ...] | None = None
    resnet_width: int = 64

    def __post_init__(self):
        if self.resnet_layers is not None:              # JSON gives lists
            layers = tuple(int(n) for n in self.resnet_layers)
            if any(n <= 0 for n in layers):
                raise ValueError(f"ViTConfig.resnet_layers needs positive unit counts, got "
                                 f"{list(layers)}")
            object.__setattr__(self, "resnet_layers", layers)
            if self.resnet_width <= 0 or self.resnet_width % 32:
                raise ValueError(f"ViTConfig.resnet_width must be a positive multiple of 32 "
                                 f"(GroupNorm's 32 groups), got {self.resnet_width}")
        for name in ("input_mean", "input_std"):        # JSON gives lists
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != self.num_channels:
                raise ValueError(f"ViTConfig.{name} needs one value per channel "
                                 f"({self.num_channels}), got {list(value)}")
            object.__setattr__(self, name, value)
        if min(self.input_std) <= 0:
            raise ValueError(f"ViTConfig.input_std must be positive, got {self.input_std}")
        for name in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_dim",
                     "image_size", "num_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ViTConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}")
        if self.grid_size < 1:
            raise ValueError(
                f"ViTConfig.image_size={self.image_size} is smaller than one patch "
                f"({self.effective_patch_size} px); choose at least one patch")
        if self.pool not in ("token", "gap"):
            raise ValueError(f"ViTConfig.pool must be 'token' or 'gap', got {self.pool!r}")
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> ViTConfig:
        """`"B/16"` -> the paper's ViT-B with 16 x 16 patches; `"R50+B/16"` -> the hybrid of
        a ResNet-50 stem and ViT-B on its /16 feature map; keyword fields override."""
        match = re.fullmatch(r"(?:(R\d+)\+)?(?:ViT-)?(Ti|S|B|L|H)/(\d+)", variant.strip())
        if not match:
            raise ValueError(
                f"unknown ViT variant {variant!r}; use one of "
                f"{', '.join(v + '/P' for v in VARIANTS)} with a patch size P, e.g. 'B/16', "
                f"or a hybrid: {', '.join(sorted(HYBRIDS))}")
        resnet, size, patch = match.group(1), match.group(2), int(match.group(3))
        depth, width, mlp, heads = VARIANTS[size]
        fields = dict(patch_size=patch, hidden_size=width, depth=depth, num_heads=heads,
                      mlp_dim=mlp)
        if resnet:
            key = f"{resnet}+{size}/{patch}"
            layers = HYBRID_RESNETS.get((resnet, patch))
            if layers is None:
                raise ValueError(
                    f"unknown hybrid {key!r}; the ResNets are {', '.join(sorted(HYBRIDS))} "
                    f"(any ViT size), or set resnet_layers and patch_size directly")
            fields.update(resnet_layers=layers, patch_size=1)
        fields.update(overrides)
        return cls(**fields)

    @property
    def variant(self) -> str | None:
        """The variant name when the sizes are a paper variant ("B/16", "R50+B/16"), else
        None."""
        for name, (depth, width, mlp, heads) in VARIANTS.items():
            if (self.depth, self.hidden_size, self.mlp_dim, self.num_heads) == (
                    depth, width, mlp, heads):
                if self.resnet_layers is None:
                    return f"{name}/{self.patch_size}"
                resnet = next((r for (r, p), layers in HYBRID_RESNETS.items()
                               if layers == self.resnet_layers
                               and p == self.effective_patch_size), None)
                if resnet and self.patch_size == 1 and self.resnet_width == 64:
                    return f"{resnet}+{name}/{self.effective_patch_size}"
        return None

    @property
    def is_hybrid(self) -> bool:
        return self.resnet_layers is not None

    @property
    def resnet_stride(self) -> int:
        """Downsampling of the ResNet stem: 4 for the root block (conv and max pool, each
        /2), times 2 for every stage after the first; 1 for a pure ViT."""
        if self.resnet_layers is None:
            return 1
        return 4 * 2 ** max(len(self.resnet_layers) - 1, 0)

    @property
    def effective_patch_size(self) -> int:
        """Input pixels per token side: the patch size, times the ResNet's stride for
        hybrids (16 for R50+B/16)."""
        return self.patch_size * self.resnet_stride

    @property
    def feature_size(self) -> int:
        """Side of the map the patch embedding sees: the image, or the ResNet's feature map
        (each stride-2 "SAME" layer gives ceil(size / 2))."""
        size = self.image_size
        for _ in range(int(math.log2(self.resnet_stride))):
            size = -(-size // 2)
        return size

    @property
    def grid_size(self) -> int:
        """Patches per side. A size that is not a multiple of the patch leaves its last
        image_size % patch_size rows and columns unused, as vit_jax's patch embedding (a
        stride-P convolution with VALID padding) does: H/14 at 384 px sees 27 x 27 patches,
        the pixels of 378 px. Hybrids: cells of the ResNet's feature map."""
        return self.feature_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "token" else 0

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)
