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
with any patch size; `ViTConfig` also takes free sizes for tests. The numbers and `ViTConfig`
live in `pipeline.architecture` (no torch there) and are re-exported here.

Hybrids (paper §3.1 "Hybrid Architecture", Table 6, Fig. 5): the input sequence is the feature
map of a ResNet instead of raw patches, and the patch embedding (here 1 x 1 "patches") is
applied to that map. The ResNet is the one the authors' code builds (vit_jax
`models_resnet.py` and the root block in `models_vit.py`), reproduced exactly: BiT's weight
standardisation and GroupNorm, but post-activation units (norm and ReLU after each
convolution, ReLU after the sum), where BiT's ResNet-v2 units are pre-activation:

    root     StdConv 7x7/2 (width 64) - GroupNorm - ReLU - max pool 3x3/2       # /4
    stages   bottleneck units, 1x1 - 3x3 - 1x1 StdConvs (width w, w, 4w), each followed by
             GroupNorm (ReLU after the first two), a projection StdConv 1x1 + GroupNorm on the
             first unit's shortcut, ReLU after the sum; the first stage keeps the resolution,
             every later one halves it at its first unit's 3x3 and projection     # /8, /16, ...
    StdConv  weight standardisation (Qiao et al. 2019, BiT): w <- (w - mean) / (std + 1e-5)
             over (kh, kw, in) per output channel, no bias; TF "SAME" padding (the extra row
             and column of a stride-2 window go at the bottom and right)
    GroupNorm 32 groups, eps 1e-6 (flax's defaults); the last GroupNorm of each unit starts at
             scale 0, so every unit starts as its shortcut

Names as the paper writes them: "R50+B/16" is ResNet-50 with stage 4 removed and its blocks
moved to stage 3, (3, 4, 9) units, a /16 map and 1 x 1 patches; "R50+L/32" keeps the four
stages (3, 4, 6, 3) for a /32 map; "R26+S/32" and "R26+B/32" take (2, 2, 2, 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.architecture import (  # noqa: F401 - re-exported
    HYBRID_RESNETS,
    HYBRIDS,
    NO_DECAY_NAMES,
    VARIANTS,
    ViTConfig,
)


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


# ---- the hybrids' ResNet (vit_jax's: post-activation, BiT's StdConv and GroupNorm) -----------
def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF / flax "SAME" padding of (B, C, H, W) for a kernel and stride: the output has
    ceil(H / stride) rows; the total padding is split with the odd one at the bottom / right
    (PyTorch's symmetric padding puts it on both sides and shifts every stride-2 window)."""
    H, W = x.shape[-2:]
    ph = max((-(-H // stride) - 1) * stride + kernel - H, 0)
    pw = max((-(-W // stride) - 1) * stride + kernel - W, 0)
    if ph == pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (vit_jax `models_resnet.StdConv`): each output
    channel's kernel is standardised over (in, kh, kw) in every forward,
    (w - mean) / (std + 1e-5); no bias; "SAME" padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=False)
        self.eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, correction=0)      # jnp.std: population
        return (w - mean) / (std + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.standardized_weight(), None, self.stride)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)                       # flax's defaults


class Bottleneck(nn.Module):
    """vit_jax `ResidualUnit`: 1x1 (w) - 3x3 (w, stride) - 1x1 (4w) StdConvs with GroupNorm,
    ReLU after the first two, a projected shortcut (1x1 StdConv, stride, + GroupNorm) when the
    shape changes, ReLU after the sum."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv_proj = StdConv2d(cin, cout, 1, stride) if cin != cout or stride != 1 else None
        self.gn_proj = group_norm(cout) if self.conv_proj is not None else None
        self.conv1, self.gn1 = StdConv2d(cin, width, 1), group_norm(width)
        self.conv2, self.gn2 = StdConv2d(width, width, 3, stride), group_norm(width)
        self.conv3, self.gn3 = StdConv2d(width, cout, 1), group_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))                           # (B, w, H/s, W/s)
        return F.relu(shortcut + self.gn3(self.conv3(y)))             # (B, 4w, H/s, W/s)


class ResNetStem(nn.Module):
    """The hybrids' ResNet: root block (StdConv 7x7/2, GroupNorm, ReLU, max pool 3x3/2,
    "SAME"), then `layers[i]` bottleneck units per stage, of width `width * 2**i` (output
    4x that); the first stage keeps the resolution, each later one halves it."""

    def __init__(self, layers: tuple[int, ...], width: int, in_channels: int):
        super().__init__()
        self.conv_root = StdConv2d(in_channels, width, 7, 2)
        self.gn_root = group_norm(width)
        self.stages = nn.ModuleList()
        cin = width
        for i, units in enumerate(layers):
            w = width * 2**i
            self.stages.append(nn.Sequential(*(
                Bottleneck(cin if j == 0 else 4 * w, w, 2 if (i > 0 and j == 0) else 1)
                for j in range(units))))
            cin = 4 * w
        self.out_channels = cin

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(images)))             # (B, w, H/2, W/2)
        x = F.max_pool2d(pad_same(x, 3, 2, float("-inf")), 3, 2)     # (B, w, H/4, W/4)
        for stage in self.stages:
            x = stage(x)
        return x                                                     # (B, C, H/s, W/s)


class ViT(nn.Module):
    """Vision Transformer. `forward(images)` -> logits; images are (B, C, H, W) scaled to
    [-1, 1] as in the authors' code."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.resnet = (ResNetStem(cfg.resnet_layers, cfg.resnet_width, cfg.num_channels)
                       if cfg.is_hybrid else None)
        embed_in = self.resnet.out_channels if self.resnet is not None else cfg.num_channels
        self.patch_embed = nn.Conv2d(embed_in, D, cfg.patch_size, stride=cfg.patch_size)
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
        if self.resnet is not None:
            # flax's defaults: LeCun normal kernels (standardised in every forward anyway),
            # GroupNorm scale 1 and bias 0, except each unit's last scale: 0 (vit_jax gn3).
            for m in self.resnet.modules():
                if isinstance(m, StdConv2d):
                    _lecun_normal_(m.weight)
                elif isinstance(m, nn.GroupNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            for m in self.resnet.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.gn3.weight)

    # ---- forward --------------------------------------------------------------------------
    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch embeddings (B, N, D): of the pixels, or, for a
        hybrid, of the ResNet's feature map."""
        x = self.resnet(images) if self.resnet is not None else images   # (B, C', H', W')
        x = self.patch_embed(x)                                    # (B, D, H'/P, W'/P)
        return x.flatten(2).transpose(1, 2)                        # (B, N, D)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens with position embeddings (B, N(+1), D)."""
        return self.add_pos_embed(self.patch_tokens(images))

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

    def shard_units(self) -> list[nn.Module]:
        """The submodules a sharded (FSDP) wrapper makes units of their own, in forward order:
        the ResNet of a hybrid, then each encoder block."""
        return ([self.resnet] if self.resnet is not None else []) + list(self.blocks)

    def pixel_filters(self) -> torch.Tensor:
        """The first layer's filters, the ones that see pixels (out, C, k, k): the patch
        embedding, or a hybrid's root convolution as it is applied (standardised)."""
        if self.resnet is not None:
            return self.resnet.conv_root.standardized_weight().detach()
        return self.patch_embed.weight.detach()

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
