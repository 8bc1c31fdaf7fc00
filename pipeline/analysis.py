"""Inspecting a trained ViT as the paper does (Dosovitskiy et al., ICLR 2021, §4.5 "Inspecting
Vision Transformer", Fig. 6 and 7, App. D.7-D.8). Plain PyTorch, no Ray:

- **Mean attention distance** (Fig. 7 right, D.7): per layer and head, how far in input pixels
  a patch attends: the attention-weighted distance between the centres of the query patch and
  the key patches, averaged over queries and images. Only patch tokens count: the class
  token's row and column are dropped and each row is renormalised to sum to 1. The paper's
  reading: some heads of the lowest layers attend locally, others already globally, and the
  distance grows with depth.
- **Attention rollout** (Abnar & Zuidema, ACL 2020, "Quantifying Attention Flow in
  Transformers"; Fig. 6, D.8): per layer the head-averaged attention plus the identity (the
  residual connection), rows renormalised, multiplied through the layers,
  R = A_L ... A_1. The class token's row of R over the patches (the mean of the patch rows for
  GAP models, which have no class token) says which image regions reach the representation.
- **Position-embedding similarity** (Fig. 7 centre): the cosine similarity of each patch's
  learned position embedding with every other's, drawn as a grid of grids. Closer patches have
  more similar embeddings when the model has learned the 2-D image topology.
- **Embedding filters** (Fig. 7 left): the first principal components of the patch-embedding
  filters (the rows of the linear projection E, each a P x P x C filter); for a hybrid, of
  the filters that see the pixels, the ResNet's 7 x 7 root convolution (standardised).

Hybrids (§3.1) need nothing else: their tokens are cells of the ResNet's feature map, each
covering `effective_patch_size` pixels (16 for R50+B/16), and the distances are in those
pixels.

`analyze` streams batches of images through the model one layer of attention at a time;
`write` draws the figures and writes `attention.json`. `jobs/analyze.py` is the command.
"""

from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.data.shards import MANIFEST, VTAB_SPLITS, DatasetError, parse_vtab_list
from pipeline.model import ViT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NUM_FILTER_COMPONENTS = 28          # as many as Fig. 7 (left) shows


class AnalysisError(ValueError):
    """Bad input to the analysis (no images, an unreadable one), in one line."""


# ---------------------------------------------------------------------------------------------
# The measures
# ---------------------------------------------------------------------------------------------
def token_distances(grid: int, pixels_per_token: int) -> torch.Tensor:
    """(N, N) float64 Euclidean distances, in input pixels, between the centres of the tokens
    of a grid x grid map in row-major order, each token covering pixels_per_token pixels a
    side (the patch size for a ViT)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], 1).double() * pixels_per_token
    return torch.cdist(centres, centres)                                   # (N, N)


def mean_attention_distance(attn: torch.Tensor, distances: torch.Tensor,
                            num_prefix_tokens: int) -> torch.Tensor:
    """Attention (B, H, T, T), T = prefix + N, and token distances (N, N) -> (B, H): each
    image's and head's attention-weighted query-key distance over patch tokens, averaged over
    the queries. Prefix (class token) rows and columns are dropped, rows renormalised."""
    a = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].float()        # (B, H, N, N)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    return (a * distances.to(a)).sum(-1).mean(-1)                         # (B, H)


def rollout_step(rollout: torch.Tensor | None, attn: torch.Tensor) -> torch.Tensor:
    """Fold one more layer's attention (B, H, T, T) into the rollout (B, T, T):
    A = mean over heads + I, rows renormalised; rollout <- A @ rollout."""
    a = attn.float().mean(1)                                               # (B, T, T)
    a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    a = a / a.sum(-1, keepdim=True)
    return a if rollout is None else a @ rollout


def rollout_over_patches(rollout: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Rollout (B, T, T) -> (B, N) over the patches, summing to 1: the class token's row, or,
    with no class token (GAP), the mean of the patch rows."""
    rows = rollout[:, 0] if num_prefix_tokens else rollout.mean(1)        # (B, T)
    patches = rows[:, num_prefix_tokens:]                                  # (B, N)
    return patches / patches.sum(-1, keepdim=True)


def pos_embed_similarity(pos_embed: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Position embedding (1, prefix + N, D) -> (N, N) cosine similarities of the patches'."""
    p = F.normalize(pos_embed[0, num_prefix_tokens:].double(), dim=-1)    # (N, D)
    return p @ p.T


def neighbour_similarity(similarity: torch.Tensor) -> tuple[float | None, float | None]:
    """(mean similarity of each patch with its 4 grid neighbours, mean with the others): a
    one-number check that the position embeddings learned the 2-D grid (the first well above
    the second). None where a 1 x 1 or 2 x 2 grid has no such pairs."""
    d = token_distances(math.isqrt(similarity.shape[0]), 1)

    def mean(mask: torch.Tensor) -> float | None:
        return float(similarity[mask].mean()) if mask.any() else None

    return mean(d == 1.0), mean(d > 1.0)


def embedding_components(weight: torch.Tensor, k: int = NUM_FILTER_COMPONENTS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embedding filters (D, C, P, P) -> (their first k principal components
    (k, C, P, P), the fraction of the filters' variance each explains (k,))."""
    D, C, P, Q = weight.shape
    x = weight.detach().flatten(1).double().cpu()                          # (D, C*P*P)
    x = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = s**2
    k = min(k, vh.shape[0])
    return vh[:k].reshape(k, C, P, Q), (var / var.sum())[:k]


# ---------------------------------------------------------------------------------------------
# Running a model over images
# ---------------------------------------------------------------------------------------------
@dataclass
class Inspection:
    """What `analyze` measured over `num_images` images."""

    mean_distance: np.ndarray           # (L, H) mean attention distance in input pixels
    num_images: int
    images: np.ndarray                  # (K, S, S, 3) uint8: the first K images, as fed
    names: list[str]                    # their names
    rollout: np.ndarray                 # (K, g, g) their rollout over the patches (sums to 1)
    image_size: int
    patch_size: int
    pixels_per_token: int
    grid: int
    pool: str
    uniform_distance: float = 0.0       # the mean distance of uniform attention (reference)
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def analyze(model: ViT, batches: Iterable[tuple[list[str], np.ndarray]], *,
            device: str | torch.device = "cpu", bf16: bool = False, keep: int = 6,
            progress: Callable[[int], None] | None = None) -> Inspection:
    """Run `model` over batches of (names, uint8 images (B, S, S, 3) at the model's
    resolution), one layer's attention in memory at a time, accumulating the mean attention
    distance of every layer and head and the rollout of the first `keep` images.
    `progress(images so far)` is called after each batch."""
    cfg = model.cfg
    device = torch.device(device)
    model = model.to(device).eval()
    # A token covers patch_size pixels a side, or, in a hybrid, patch_size cells of the
    # ResNet's feature map: effective_patch_size pixels (16 for R50+B/16).
    prefix, grid, pixels = cfg.num_prefix_tokens, cfg.grid_size, cfg.effective_patch_size
    distances = token_distances(grid, pixels).to(device)
    sums = torch.zeros(cfg.depth, cfg.num_heads, dtype=torch.float64)
    count, kept_images, kept_names, kept_rollout = 0, [], [], []
    for names, images in batches:
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise AnalysisError(f"images are {images.shape[1]}x{images.shape[2]} but the model "
                                f"takes {cfg.image_size}x{cfg.image_size}")
        from pipeline.data.transforms import to_model_input

        x = to_model_input(torch.from_numpy(images).to(device), cfg.input_mean, cfg.input_std)
        rollout = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for layer, attn in enumerate(model.iter_attention(x)):
                with torch.autocast(device.type, enabled=False):       # measures in fp32
                    attn = attn.float()
                    sums[layer] += mean_attention_distance(attn, distances, prefix).sum(0).cpu()
                    rollout = rollout_step(rollout, attn)
        if len(kept_images) < keep:
            take = keep - len(kept_images)
            kept_images += list(images[:take])
            kept_names += list(names[:take])
            kept_rollout += list(rollout_over_patches(rollout[:take], prefix)
                                 .reshape(-1, grid, grid).cpu().numpy())
        count += len(images)
        if progress:
            progress(count)
    if not count:
        raise AnalysisError("no images to analyse")
    S = cfg.image_size
    return Inspection(
        mean_distance=(sums / count).numpy(), num_images=count,
        images=np.stack(kept_images) if kept_images else np.zeros((0, S, S, 3), np.uint8),
        names=kept_names, rollout=np.stack(kept_rollout), image_size=S,
        patch_size=cfg.effective_patch_size, pixels_per_token=pixels, grid=grid, pool=cfg.pool,
        uniform_distance=float(distances.mean()))


# ---------------------------------------------------------------------------------------------
# Images to analyse: WebDataset shards, a VTAB-1k task split, or a folder of images
# ---------------------------------------------------------------------------------------------
def _exists(uri: str) -> bool:
    return storage.object_metadata(uri) is not None if storage.is_s3(uri) else Path(uri).exists()


def _join(base: str, name: str) -> str:
    return storage.join(base, name) if storage.is_s3(base) else str(Path(base) / name)


def _listing(src: str) -> list[str]:
    """Every file under a folder or s3:// prefix (URIs), sorted."""
    if storage.is_s3(src):
        return [storage.join(src, k) for k in sorted(storage.list_objects(src))]
    folder = Path(src)
    if not folder.is_dir():
        raise AnalysisError(f"{src}: no such folder or file; give WebDataset shards, a VTAB-1k "
                            f"task folder or a folder of images")
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]


def image_source(src: str, split: str | None = None) -> tuple[str, Iterator[tuple[str, bytes]]]:
    """-> (what SRC is, an iterator of (name, encoded image)). SRC, local or s3://:

    - a dataset folder with manifest.json (jobs/make_shards.py): the shards of `split`
      (default train, else the manifest's first split);
    - WebDataset shards: one .tar, a brace pattern, or a folder of .tar files;
    - a VTAB-1k task folder (`<split>.txt` lists, images/<split>/...): `split`, default test;
    - a folder of .jpg / .png images (searched recursively).
    """
    src = str(src).rstrip("/")
    if "{" in src or src.endswith(".tar"):
        from pipeline.data.index import expand

        shards = expand(src)
        return f"{len(shards)} WebDataset shard(s) {src}", _shard_images(shards)
    if _exists(_join(src, MANIFEST)):
        from pipeline.data.shards import read_manifest

        manifest = read_manifest(src)
        splits = manifest["splits"]
        chosen = split or ("train" if "train" in splits else sorted(splits)[0])
        if chosen not in splits:
            raise AnalysisError(f"{src}: no split {chosen!r}; it has {sorted(splits)}")
        shards = [_join(src, e["name"]) for e in splits[chosen]["shards"]]
        return (f"dataset {src}, split {chosen} ({len(shards)} shard(s))",
                _shard_images(shards))
    lists = [s for s in VTAB_SPLITS if _exists(_join(src, f"{s}.txt"))]
    if lists:
        chosen = split or ("test" if "test" in lists else lists[0])
        if chosen not in lists:
            raise AnalysisError(f"{src}: no {chosen}.txt; this VTAB-1k task folder has "
                                f"{', '.join(lists)}")
        list_uri = _join(src, f"{chosen}.txt")
        try:
            entries = parse_vtab_list(storage.read_bytes(list_uri).decode(), list_uri)
        except DatasetError as err:
            raise AnalysisError(str(err)) from None
        uris = [_join(src, rel) for _, rel, _ in entries]
        return f"VTAB-1k task {src}, split {chosen}", _file_images(uris)
    files = _listing(src)
    shards = [f for f in files if f.endswith(".tar")]
    if shards:
        return f"{len(shards)} WebDataset shard(s) under {src}", _shard_images(shards)
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if images:
        return f"image folder {src} ({len(images)} images)", _file_images(images)
    raise AnalysisError(f"{src}: no images found (no manifest.json, VTAB-1k list, .tar shard or "
                        f".jpg/.png file); give WebDataset shards, a VTAB-1k task folder or a "
                        f"folder of images")


def _file_images(uris: list[str]) -> Iterator[tuple[str, bytes]]:
    for uri in uris:
        try:
            yield uri, storage.read_bytes(uri)
        except storage.StorageError as err:
            raise AnalysisError(str(err)) from None


def _shard_images(shards: list[str]) -> Iterator[tuple[str, bytes]]:
    """The image members of WebDataset shards, in order (labels and other members ignored:
    the analysis needs none)."""
    for uri in shards:
        fs, path = storage.filesystem(uri)
        try:
            stream = storage.open_read(fs, path)
        except FileNotFoundError:
            raise AnalysisError(f"{uri}: no such shard") from None
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                        yield f"{uri}:{member.name}", tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise AnalysisError(f"{uri}: not a readable tar shard ({err}); the shard is "
                                f"truncated or corrupt") from None


def image_batches(items: Iterator[tuple[str, bytes]], size: int, num_images: int,
                  batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decode and resize (bilinear, as VTAB evaluation) the first `num_images` images to
    size x size uint8, in batches."""
    from pipeline.data.transforms import Augment, decode_and_augment

    aug, rng = Augment("resize", size), np.random.default_rng(0)     # "resize" draws nothing
    names, images, seen = [], [], 0
    for name, data in items:
        if seen >= num_images:
            break
        try:
            images.append(decode_and_augment(data, aug, rng))
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
            raise AnalysisError(f"{name}: cannot be decoded as an image "
                                f"({type(err).__name__}); the file is corrupt or not an "
                                f"image") from None
        names.append(name)
        seen += 1
        if len(images) == batch_size:
            yield names, np.stack(images)
            names, images = [], []
    if images:
        yield names, np.stack(images)


# ---------------------------------------------------------------------------------------------
# Outputs: attention.json, figures, the terminal table
# ---------------------------------------------------------------------------------------------
def layer_table(result: Inspection) -> str:
    """Per layer: min / mean / max over heads of the mean attention distance."""
    d = result.mean_distance
    lines = [f"mean attention distance in pixels ({result.num_images} images, "
             f"{result.image_size} px, {result.pixels_per_token} px per token; uniform "
             f"attention: {result.uniform_distance:.1f})",
             f"{'layer':>5}  {'min':>7}  {'mean':>7}  {'max':>7}", "-" * 33]
    for i, row in enumerate(d, 1):
        lines.append(f"{i:5d}  {row.min():7.1f}  {row.mean():7.1f}  {row.max():7.1f}")
    return "\n".join(lines)


def summary(result: Inspection, pos_similarity: torch.Tensor,
            components: tuple[torch.Tensor, torch.Tensor], meta: dict) -> dict:
    """The contents of attention.json."""
    near, far = neighbour_similarity(pos_similarity)
    return {
        **meta,
        "image_size": result.image_size, "patch_size": result.patch_size,
        "pixels_per_token": result.pixels_per_token, "grid": result.grid,
        "pool": result.pool, "num_images": result.num_images,
        "mean_distance": [[round(float(v), 4) for v in row] for row in result.mean_distance],
        "layers": [{"layer": i, "min": float(r.min()), "mean": float(r.mean()),
                    "max": float(r.max())} for i, r in enumerate(result.mean_distance, 1)],
        "uniform_attention_distance": result.uniform_distance,
        "rollout": {"images": result.names,
                    "over_patches": [[[round(float(v), 6) for v in row] for row in r]
                                     for r in result.rollout]},
        "pos_embed": {"grid": math.isqrt(pos_similarity.shape[0]),
                      "neighbour_similarity": near, "other_similarity": far},
        "embedding_filters": {"components": int(components[0].shape[0]),
                              "explained_variance": [float(v) for v in components[1]]},
    }


def write(result: Inspection, pos_similarity: torch.Tensor,
          components: tuple[torch.Tensor, torch.Tensor], out: Path, meta: dict,
          title: str = "") -> dict[str, Path]:
    """attention.json and the four figures in `out`; -> {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "attention.json",
             "distance": out / "attention_distance.png",
             "rollout": out / "attention_rollout.png",
             "pos_embed": out / "position_embedding_similarity.png",
             "filters": out / "embedding_filters.png"}
    doc = summary(result, pos_similarity, components, meta)
    files["json"].write_text(json.dumps(doc, indent=1) + "\n")
    plot_distance(result, files["distance"], title)
    plot_rollout(result, files["rollout"], title)
    plot_pos_similarity(pos_similarity, files["pos_embed"], title)
    plot_filters(components, files["filters"], title)
    return files


def plot_distance(result: Inspection, path: Path, title: str = "") -> None:
    """Fig. 7 (right): one dot per head, per layer."""
    import matplotlib.pyplot as plt

    d = result.mean_distance
    L, H = d.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * L + 2), 4), dpi=120)
    cmap = plt.get_cmap("tab20", max(H, 2))
    for h in range(H):
        ax.scatter(np.arange(1, L + 1), d[:, h], s=14, color=cmap(h), label=f"head {h + 1}")
    ax.axhline(result.uniform_distance, color="grey", lw=0.8, ls="--")
    ax.text(0.6, result.uniform_distance, " uniform attention", va="bottom", fontsize=7,
            color="grey")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xlim(0.5, L + 0.5)
    ax.set_ylim(0, result.image_size * 0.75)
    ax.set_xticks(range(1, L + 1, max(1, L // 12)))
    if H <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right", frameon=False)
    ax.set_title(f"{title}\n{result.num_images} images, {result.image_size} px".strip(),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_rollout(result: Inspection, path: Path, title: str = "") -> None:
    """Fig. 6: each image above itself weighted by its attention rollout (upsampled to the
    image, scaled to a maximum of 1)."""
    import matplotlib.pyplot as plt

    K = len(result.images)
    if K == 0:
        return
    S = result.image_size
    fig, axes = plt.subplots(2, K, figsize=(1.9 * K, 4.1), dpi=120, squeeze=False)
    for i in range(K):
        mask = torch.from_numpy(result.rollout[i])[None, None].float()        # (1, 1, g, g)
        mask = F.interpolate(mask, size=(S, S), mode="bilinear", align_corners=False)[0, 0]
        mask = (mask / mask.max()).clamp(0, 1).numpy()[..., None]              # (S, S, 1)
        axes[0, i].imshow(result.images[i])
        axes[1, i].imshow((result.images[i] * mask).astype(np.uint8))
        for ax in axes[:, i]:
            ax.set_axis_off()
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("attention rollout", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pos_similarity(similarity: torch.Tensor, path: Path, title: str = "") -> None:
    """Fig. 7 (centre): tile (r, c) shows the similarity of patch (r, c)'s position embedding
    with every patch's, as a grid; one image with a one-pixel gap between tiles."""
    import matplotlib.pyplot as plt

    g = math.isqrt(similarity.shape[0])
    tiles = similarity.numpy().reshape(g, g, g, g)                  # (row, col, row', col')
    mosaic = np.full((g * (g + 1) - 1, g * (g + 1) - 1), np.nan)
    for r in range(g):
        for c in range(g):
            mosaic[r * (g + 1):r * (g + 1) + g, c * (g + 1):c * (g + 1) + g] = tiles[r, c]
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ticks = [i * (g + 1) + (g - 1) / 2 for i in range(g)]
    step = max(1, g // 8)
    ax.set_xticks(ticks[::step], [str(i + 1) for i in range(g)][::step], fontsize=7)
    ax.set_yticks(ticks[::step], [str(i + 1) for i in range(g)][::step], fontsize=7)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    ax.set_title(f"{title}\nPosition embedding similarity".strip(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_filters(components: tuple[torch.Tensor, torch.Tensor], path: Path,
                 title: str = "") -> None:
    """Fig. 7 (left): each principal component scaled to [0, 1], drawn as an RGB filter
    (grey when the input has another number of channels), 7 to a row."""
    import matplotlib.pyplot as plt

    comps, explained = components
    k = comps.shape[0]
    cols = min(7, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.6), dpi=120,
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= k:
            continue
        c = comps[i].numpy()                                        # (C, P, P)
        c = (c - c.min()) / max(c.max() - c.min(), 1e-12)
        img = c.transpose(1, 2, 0) if c.shape[0] == 3 else c[0]
        ax.imshow(img, cmap=None if c.shape[0] == 3 else "gray", interpolation="nearest")
        ax.set_title(f"{100 * explained[i]:.1f}%", fontsize=6)
    fig.suptitle(f"{title}\nEmbedding filters: first {k} principal components".strip(),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
