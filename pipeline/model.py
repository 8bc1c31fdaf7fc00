"""The Vision Transformer of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021).

Architecture (paper §3.1, eq. 1-4; App. B.1):

    patches  = Conv(P x P, stride P)(image)                       # (B, N, D), N = HW / P^2
    z_0      = [class; patches] + pos_embed                        # (B, N + 1, D)
    z_0      = Dropout(z_0)
    z'_l     = MSA(LN(z_{l-1})) + z_{l-1}                          # pre-LN blocks, l = 1..L
    z_l      = MLP(LN(z'_l)) + z'_l                                # Linear-GELU-Linear
    y        = LN(z_L)[:, 0]                                       # the class token
    logits   = head(tanh(pre_logits(y)))   at pre-training         # pre_logits optional
    logits   = head(y), head zero-initialised, at fine-tuning      # `reset_head`

Dropout follows App. B.1: after every dense layer except the qkv projections (the attention
output projection and both MLP layers) and directly after adding the position embeddings.
Attention runs through `torch.nn.functional.scaled_dot_product_attention` (flash / memory
efficient kernels where the device has them).

Weight initialisation is that of the authors' reference code (google-research/vision_transformer
`vit_jax/models_vit.py`, which big_vision's `models/vit.py` follows):

- patch embedding: LeCun normal (truncated normal, variance 1 / fan_in, fan_in = P*P*C), bias 0;
- class token: zeros;  position embedding: normal(std=0.02);
- qkv and attention output projections: Xavier uniform, each of q, k, v as its own D x D
  matrix (flax `DenseGeneral` over heads), bias 0;
- MLP layers: Xavier uniform, bias normal(std=1e-6);
- pre-logits: LeCun normal, bias 0;  classifier head: zeros (`head_kernel_init` in vit_jax);
- LayerNorm: scale 1, bias 0, eps 1e-6 (flax's default).

GELU is the exact (erf) form, as in the PyTorch ports of the authors' checkpoints (timm, Hugging
Face); vit_jax's flax default is the tanh approximation, which differs by less than 1e-3.

Variants (paper Table 1; Ti and S from DeiT) are named "Ti/16", "S/16", "B/16", "L/16", "H/14"
with any patch size; `ViTConfig` also takes free sizes for tests.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

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

    def __post_init__(self):
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
        if self.image_size < self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size={self.image_size} is smaller than "
                f"patch_size={self.patch_size}; choose at least one patch")
        if self.pool not in ("token", "gap"):
            raise ValueError(f"ViTConfig.pool must be 'token' or 'gap', got {self.pool!r}")
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> ViTConfig:
        """`"B/16"` -> the paper's ViT-B with 16 x 16 patches; keyword fields override."""
        match = re.fullmatch(r"(?:ViT-)?(Ti|S|B|L|H)/(\d+)", variant.strip())
        if not match:
            raise ValueError(
                f"unknown ViT variant {variant!r}; use one of "
                f"{', '.join(v + '/P' for v in VARIANTS)} with a patch size P, e.g. 'B/16'")
        depth, width, mlp, heads = VARIANTS[match.group(1)]
        fields = dict(patch_size=int(match.group(2)), hidden_size=width, depth=depth,
                      num_heads=heads, mlp_dim=mlp)
        fields.update(overrides)
        return cls(**fields)

    @property
    def variant(self) -> str | None:
        """The variant name when the sizes are a paper variant, else None."""
        for name, (depth, width, mlp, heads) in VARIANTS.items():
            if (self.depth, self.hidden_size, self.mlp_dim, self.num_heads) == (
                    depth, width, mlp, heads):
                return f"{name}/{self.patch_size}"
        return None

    @property
    def grid_size(self) -> int:
        """Patches per side. A size that is not a multiple of the patch leaves its last
        image_size % patch_size rows and columns unused, as vit_jax's patch embedding (a
        stride-P convolution with VALID padding) does: H/14 at 384 px sees 27 x 27 patches,
        the pixels of 378 px."""
        return self.image_size // self.patch_size

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


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_dropout = attention_dropout
        self.proj_drop = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                          # 3 x (B, H, N, d)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self._qkv(x)
        p = self.attention_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)                 # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)                                   # (B, N, D)
        return self.proj_drop(self.proj(x))

    def forward_first_query(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output of the first token only (B, 1, D): the same values as
        `forward(x)[:, :1]`, with the query projection, attention rows and output projection
        of the other N - 1 tokens skipped."""
        B, N, D = x.shape
        H, d = self.num_heads, D // self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:D], b[:D]).reshape(B, 1, H, d).transpose(1, 2)   # (B, H, 1, d)
        kv = F.linear(x, w[D:], b[D:]).reshape(B, N, 2, H, d)                  # (B, N, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                               # 2 x (B, H, N, d)
        p = self.attention_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)                 # (B, H, 1, d)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, 1, D)))     # (B, 1, D)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights (B, H, N, N), computed explicitly (no dropout)."""
        q, k, _ = self._qkv(x)
        scale = q.shape[-1] ** -0.5
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch (B, ...): zero it for a random p of the samples
    and scale the rest by 1 / (1 - p), so its expectation, and evaluation, are unchanged
    (timm's and DeiT's form; big_vision's Mixer drops without rescaling)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Block(nn.Module):
    """Pre-LN encoder block: z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z'. `drop_path`: this
    block's stochastic-depth rate."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_dim, cfg.dropout)

    def forward(self, x: torch.Tensor, first_token_only: bool = False) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with `first_token_only`, `forward(x)[:, :1]` (B, 1, D)
        without the work whose only use is the other tokens. One entry point for both, so a
        sharding wrapper (FSDP) that gathers parameters around `forward` sees every call."""
        p, training = self.drop_path, self.training
        if first_token_only:
            x = x[:, :1] + drop_path(self.attn.forward_first_query(self.norm1(x)), p, training)
        else:
            x = x + drop_path(self.attn(self.norm1(x)), p, training)
        return x + drop_path(self.mlp(self.norm2(x)), p, training)


class ViT(nn.Module):
    """Vision Transformer. `forward(images)` -> logits; images are (B, C, H, W) scaled to
    [-1, 1] as in the authors' code."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "token" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + cfg.num_prefix_tokens, D))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.drop_path * i / max(cfg.depth - 1, 1)) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.pre_logits = (nn.Linear(D, cfg.representation_size)
                           if cfg.representation_size else None)
        head_in = cfg.representation_size or D
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes else None
        self.reset_parameters()

    # ---- initialisation (vit_jax) -------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        D = self.cfg.hidden_size
        _lecun_normal_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            for i in range(3):  # q, k, v: each a D x D matrix of its own
                nn.init.xavier_uniform_(block.attn.qkv.weight[i * D:(i + 1) * D])
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for fc in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
            for norm in (block.norm1, block.norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if self.pre_logits is not None:
            _lecun_normal_(self.pre_logits.weight)
            nn.init.zeros_(self.pre_logits.bias)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ---- forward --------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens with position embeddings (B, N(+1), D)."""
        x = self.patch_embed(images)                               # (B, D, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)                           # (B, N, D)
        return self.add_pos_embed(x)

    def add_pos_embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, N, D) -> [class; patches] + pos_embed, dropout (B, N+1, D)."""
        if patches.shape[1] != self.cfg.num_patches:
            raise ValueError(
                f"got {patches.shape[1]} patches but the model is built for "
                f"{self.cfg.num_patches} ({self.cfg.image_size}px); resample the position "
                f"embedding with load_vit(..., image_size=...) for another resolution")
        if self.cls_token is not None:
            cls = self.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, D)
            patches = torch.cat([cls, patches], dim=1)             # (B, N+1, D)
        return self.pos_drop(patches + self.pos_embed)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the encoder blocks and the final LayerNorm on tokens (B, N(+1), D)."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the representation y (B, D): LN'd class token (or mean)."""
        x = self.embed(images)                                     # (B, N(+1), D)
        if self.cfg.pool == "gap":
            return self.encode(x).mean(dim=1)                      # (B, D)
        # Only the class token of the last block is used: skip the rest of that block's
        # work (about 80% of it; exact, see `test_first_token_path_is_exact`).
        for block in self.blocks[:-1]:
            x = block(x)
        return self.norm(self.blocks[-1](x, first_token_only=True))[:, 0]  # (B, D)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Representation (B, D) -> logits (B, K); `pre_logits=True` stops before the head."""
        if self.pre_logits is not None:
            features = torch.tanh(self.pre_logits(features))
        if pre_logits or self.head is None:
            return features
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every layer: a list of L tensors (B, H, N(+1), N(+1))."""
        return list(self.iter_attention(images))

    @torch.no_grad()
    def iter_attention(self, images: torch.Tensor):
        """The softmax attention of each layer in turn, (B, H, N(+1), N(+1)), one layer in
        memory at a time (B/16 at 224 px holds 1.9 MB of attention per image and layer)."""
        x = self.embed(images)
        for block in self.blocks:
            yield block.attn.attention_map(block.norm1(x))
            x = block(x)

    # ---- heads, resolution, optimizer groups ------------------------------------------
    def reset_head(self, num_classes: int) -> None:
        """Fine-tuning head (§3.2): remove the whole pre-training head (pre-logits and
        classifier) and attach one zero-initialised linear layer D -> num_classes."""
        ref = self.norm.weight
        self.pre_logits = None
        self.head = nn.Linear(self.cfg.hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.cfg = self.cfg.replace(num_classes=num_classes, representation_size=None)

    def set_image_size(self, image_size: int) -> None:
        """Change the input resolution, keeping P: resample the position embedding on the
        patch grid (bilinear, as vit_jax's `interpolate_posembed`)."""
        new_cfg = self.cfg.replace(image_size=image_size)
        if new_cfg.grid_size != self.cfg.grid_size:
            pos = resample_pos_embed(self.pos_embed.data, new_cfg.grid_size,
                                     self.cfg.num_prefix_tokens)
            self.pos_embed = nn.Parameter(pos)
        self.cfg = new_cfg

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: weight decay on weight matrices only; none on biases, norms,
        the position embedding or the class token."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters `param_groups` exempts from weight decay."""
        return {n for n, p in self.named_parameters()
                if p.ndim < 2 or n.split(".")[-1] in NO_DECAY_NAMES}


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a (1, prefix + g*g, D) position embedding to a new patch grid.

    2-D bilinear interpolation on the grid with corners aligned, the class-token row kept
    aside: the same as vit_jax's `scipy.ndimage.zoom(grid, (g'/g, g'/g, 1), order=1)`.
    Computed in float64 and returned in the input's dtype.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} patch positions, "
                         f"not a square grid")
    new_hw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    if new_hw == (old, old):
        return pos_embed.clone()
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).double()      # (1, D, g, g)
    grid = F.interpolate(grid, size=new_hw, mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], D)  # (1, g'*g', D)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


def _lecun_normal_(w: torch.Tensor) -> None:
    """flax `lecun_normal`: truncated normal in [-2, 2] std, variance 1/fan_in after truncation."""
    fan_in = w[0].numel()  # (out, in, ...) in PyTorch layout
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
