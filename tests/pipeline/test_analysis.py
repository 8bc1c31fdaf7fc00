"""The inspection measures of the ViT paper (§4.5): attention distance, rollout, position
embedding similarity, embedding filters; against hand-built attention, independent
transcriptions, and Hugging Face transformers' attention weights."""

from __future__ import annotations

import io
import itertools
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import analysis
from pipeline.analysis import (
    AnalysisError,
    embedding_components,
    mean_attention_distance,
    neighbour_similarity,
    pos_embed_similarity,
    rollout_over_patches,
    rollout_step,
    token_distances,
)
from pipeline.model import ViT, ViTConfig


def centres(grid: int, patch: int) -> list[tuple[float, float]]:
    """Patch centres in pixels, row-major, written out without the code under test."""
    return [((r + 0.5) * patch, (c + 0.5) * patch) for r in range(grid) for c in range(grid)]


def with_prefix(patch_attn: torch.Tensor, prefix: int, class_mass: float = 0.0) -> torch.Tensor:
    """(B, H, N, N) patch-to-patch attention -> (B, H, T, T): `class_mass` of every patch
    row moved onto a class token, whose own row is uniform."""
    B, H, N, _ = patch_attn.shape
    T = N + prefix
    full = torch.full((B, H, T, T), 1.0 / T)
    full[:, :, prefix:, prefix:] = patch_attn * (1 - class_mass)
    if prefix:
        full[:, :, prefix:, 0] = class_mass
    return full


@pytest.mark.parametrize("prefix", [0, 1])
def test_attention_to_itself_only_has_distance_zero(prefix):
    N = 25
    eye = torch.eye(N).expand(2, 3, N, N)
    # Even with most of each row on the class token, which the measure drops and renormalises.
    attn = with_prefix(eye, prefix, class_mass=0.7 if prefix else 0.0)
    d = mean_attention_distance(attn, token_distances(5, 16), prefix)
    assert d.shape == (2, 3)
    assert torch.count_nonzero(d) == 0


@pytest.mark.parametrize("grid,patch", [(5, 16), (4, 8), (7, 32)])
def test_uniform_attention_has_the_grids_mean_pairwise_distance(grid, patch):
    pts = centres(grid, patch)
    expected = sum(math.dist(p, q) for p, q in itertools.product(pts, pts)) / len(pts) ** 2
    N = grid * grid
    attn = with_prefix(torch.full((1, 2, N, N), 1.0 / N), 1, class_mass=0.3)
    d = mean_attention_distance(attn, token_distances(grid, patch), 1)
    torch.testing.assert_close(d, torch.full((1, 2), expected), rtol=1e-6, atol=0)


def test_attention_to_one_other_patch_has_that_distance():
    grid, patch = 6, 16
    pts = centres(grid, patch)
    N = grid * grid
    # Head 0: the patch one row down (wrapping); head 1: the mirror image across the centre.
    targets = [[(q + grid) % N for q in range(N)], [N - 1 - q for q in range(N)]]
    attn = torch.zeros(1, 2, N, N)
    for h, tgt in enumerate(targets):
        attn[0, h, torch.arange(N), torch.tensor(tgt)] = 1.0
    d = mean_attention_distance(attn, token_distances(grid, patch), 0)
    expected = [sum(math.dist(pts[q], pts[t]) for q, t in enumerate(tgt)) / N
                for tgt in targets]
    torch.testing.assert_close(d[0], torch.tensor(expected), rtol=1e-6, atol=0)


def test_rollout_of_identity_attention_is_the_identity_and_uniform_over_patches():
    T = 17
    rollout = None
    for _ in range(4):
        rollout = rollout_step(rollout, torch.eye(T).expand(2, 3, T, T))
    torch.testing.assert_close(rollout, torch.eye(T).expand(2, T, T))
    # GAP (no class token): the mean of the patch rows is uniform over the patches.
    torch.testing.assert_close(rollout_over_patches(rollout, 0), torch.full((2, T), 1 / T))


def test_rollout_of_uniform_attention_is_uniform_over_patches_from_the_class_token():
    T = 10
    rollout = None
    for _ in range(3):
        rollout = rollout_step(rollout, torch.full((1, 2, T, T), 1.0 / T))
    torch.testing.assert_close(rollout_over_patches(rollout, 1), torch.full((1, T - 1),
                                                                            1 / (T - 1)))


def test_rollout_multiplies_the_later_layer_on_the_left():
    """Abnar & Zuidema: R_l = A_l R_{l-1}, A = (head mean + I) row-normalised; written out in
    NumPy for non-commuting layers."""
    rng = np.random.default_rng(0)
    T, layers = 6, []
    for _ in range(3):
        a = rng.random((2, T, T)) ** 3                    # (H, T, T), uneven rows
        layers.append(a / a.sum(-1, keepdims=True))
    expected = np.eye(T)
    for a in layers:
        m = a.mean(0) + np.eye(T)
        m = m / m.sum(-1, keepdims=True)
        expected = m @ expected
    rollout = None
    for a in layers:
        rollout = rollout_step(rollout, torch.from_numpy(a)[None].float())
    np.testing.assert_allclose(rollout[0].numpy(), expected, rtol=1e-5)
    over = rollout_over_patches(rollout, 1)[0].numpy()
    np.testing.assert_allclose(over, expected[0, 1:] / expected[0, 1:].sum(), rtol=1e-5)


def test_position_embedding_similarity_is_the_cosine_and_sees_a_learned_grid():
    g, D = 6, 32
    rng = np.random.default_rng(0)
    # A smooth function of the 2-D position (as learned embeddings look, Fig. 7): neighbours
    # are more alike than distant patches. Random embeddings are not.
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    freqs = rng.uniform(0.1, 0.5, (D, 2))
    phase = rng.uniform(0, 2 * np.pi, D)
    smooth = np.cos(rows.reshape(-1, 1) * freqs[:, 0] + cols.reshape(-1, 1) * freqs[:, 1]
                    + phase)                                          # (N, D)
    cls = rng.normal(size=(1, D))
    pos = torch.from_numpy(np.concatenate([cls, smooth]))[None].float()
    sim = pos_embed_similarity(pos, 1)
    unit = smooth / np.linalg.norm(smooth, axis=1, keepdims=True)
    np.testing.assert_allclose(sim.numpy(), unit @ unit.T, atol=1e-6)
    near, far = neighbour_similarity(sim)
    assert near > far + 0.2
    rand = pos_embed_similarity(torch.randn(1, 1 + g * g, 256), 1)
    near_r, far_r = neighbour_similarity(rand)
    assert abs(near_r - far_r) < 0.05


def test_embedding_components_recover_the_filters_main_directions():
    rng = np.random.default_rng(0)
    C, P, D = 3, 4, 200
    u, v = rng.normal(size=C * P * P), rng.normal(size=C * P * P)
    u /= np.linalg.norm(u)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    w = (rng.normal(0, 3.0, (D, 1)) * u + rng.normal(0, 1.5, (D, 1)) * v
         + rng.normal(0, 0.05, (D, C * P * P)))
    comps, explained = embedding_components(torch.from_numpy(w).reshape(D, C, P, P), k=5)
    assert comps.shape == (5, C, P, P) and explained.shape == (5,)
    flat = comps.reshape(5, -1).numpy()
    assert abs(flat[0] @ u) > 0.99 and abs(flat[1] @ v) > 0.99
    assert explained[0] > explained[1] > 10 * explained[2]
    assert float(explained.sum()) <= 1.0 + 1e-9


# ---------------------------------------------------------------------------------------------
# Against Hugging Face transformers' attention weights, on the same imported weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [32, 48])
def test_attention_matches_transformers_output_attentions(tmp_path, image_size):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTModel

    from pipeline.weights import load_vit

    torch.manual_seed(0)
    config = HFConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=96, image_size=image_size, patch_size=8)
    config._attn_implementation = "eager"           # the one that returns the weights
    hf = ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():             # away from the init, so attention is far from uniform
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_vit(tmp_path / "hf").eval()
    x = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        theirs = hf(pixel_values=x, output_attentions=True).attentions
    mine = list(ours.iter_attention(x))
    assert len(mine) == len(theirs) == 3
    g = image_size // 8
    dist = token_distances(g, 8)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(mean_attention_distance(a, dist, 1),
                                   mean_attention_distance(b, dist, 1), atol=1e-3, rtol=1e-5)
    # Not uniform, or the comparison would prove little.
    assert (theirs[0] - 1 / theirs[0].shape[-1]).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------
# analyze(): batches, resolutions, pooling, bf16
# ---------------------------------------------------------------------------------------------
def small(**kw) -> ViT:
    torch.manual_seed(0)
    model = ViT(ViTConfig(**{**dict(patch_size=8, hidden_size=48, depth=3, num_heads=3,
                                    mlp_dim=96, image_size=32, num_classes=5), **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batches(n: int, size: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i in range(0, n, batch):
        yield [f"img{j}" for j in range(i, min(n, i + batch))], images[i:i + batch]


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_analyze_averages_over_images_whatever_the_batching(pool):
    model = small(pool=pool)
    seen = []
    one = analysis.analyze(model, batches(10, 32, 10), keep=4)
    split = analysis.analyze(model, batches(10, 32, 3), keep=4, progress=seen.append)
    assert seen == [3, 6, 9, 10]
    assert one.num_images == split.num_images == 10
    assert one.mean_distance.shape == (3, 3)
    np.testing.assert_allclose(one.mean_distance, split.mean_distance, rtol=1e-5)
    assert split.rollout.shape == (4, 4, 4) and split.images.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(split.rollout.sum((1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(one.rollout, split.rollout, rtol=1e-5)
    # Per image and head it is a distance between patch centres of a 4 x 4 grid of 8 px.
    assert (one.mean_distance > 0).all() and (one.mean_distance < math.hypot(24, 24)).all()
    # The average of the per-image measure, recomputed from the model's own attention maps.
    x = torch.from_numpy(next(batches(10, 32, 10))[1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    maps = model.attention_maps(x)
    direct = torch.stack([mean_attention_distance(m, token_distances(4, 8),
                                                  model.cfg.num_prefix_tokens).mean(0)
                          for m in maps])
    np.testing.assert_allclose(one.mean_distance, direct.numpy(), rtol=1e-5)


def test_analyze_at_another_resolution_uses_the_resampled_grid():
    model = small()
    model.set_image_size(48)
    result = analysis.analyze(model, batches(4, 48, 4), keep=2)
    assert result.grid == 6 and result.rollout.shape == (2, 6, 6)
    assert result.uniform_distance == pytest.approx(float(token_distances(6, 8).mean()))
    with pytest.raises(AnalysisError, match="images are 32x32 but the model takes 48x48"):
        analysis.analyze(model, batches(2, 32, 2))


def test_bf16_autocast_agrees_with_fp32():
    """The GPU path's arithmetic (bf16 forward, fp32 measures), here on the CPU."""
    model = small()
    fp32 = analysis.analyze(model, batches(8, 32, 8))
    bf16 = analysis.analyze(model, batches(8, 32, 8), bf16=True)
    np.testing.assert_allclose(bf16.mean_distance, fp32.mean_distance, rtol=0.03)


def test_no_images_is_an_error():
    with pytest.raises(AnalysisError, match="no images"):
        analysis.analyze(small(), iter(()))


# ---------------------------------------------------------------------------------------------
# Image sources
# ---------------------------------------------------------------------------------------------
def jpeg(seed: int, size: int = 40) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def names_of(src, split=None) -> list[str]:
    _, items = analysis.image_source(str(src), split)
    return [name for name, _ in items]


def test_sources_folder_shards_vtab_and_dataset(tmp_path):
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg(i))
    (folder / "notes.txt").write_text("not an image")
    assert [n.rsplit("/", 1)[1] for n in names_of(tmp_path / "imgs")] == ["0.jpg", "1.jpg",
                                                                          "2.jpg"]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "a-000000.tar", {"k0.jpg": jpeg(0), "k0.cls": b"1", "k1.png": jpeg(1)})
    write_tar(shards / "a-000001.tar", {"k2.jpg": jpeg(2)})
    expected = ["a-000000.tar:k0.jpg", "a-000000.tar:k1.png", "a-000001.tar:k2.jpg"]
    for src in (shards, shards / "a-{000000..000001}.tar"):
        assert [n.rsplit("/", 1)[1] for n in names_of(src)] == expected
    # A VTAB-1k task folder (its test split by default) and a sharded dataset's split.
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    write_grating_task(tmp_path / "vtab", BY_NAME["eurosat"], train=4, val=2, test=5,
                       image_size=24)
    assert len(names_of(tmp_path / "vtab" / "eurosat")) == 5
    assert len(names_of(tmp_path / "vtab" / "eurosat", "val200")) == 2
    from jobs.make_shards import main as make_shards

    assert make_shards(["synthetic", "--out", str(tmp_path / "ds"), "--num-samples", "12",
                        "--num-classes", "3", "--image-size", "16"]) == 0
    _, items = analysis.image_source(str(tmp_path / "ds"))
    batch = list(analysis.image_batches(items, 32, 7, 4))
    assert [b[1].shape for b in batch] == [(4, 32, 32, 3), (3, 32, 32, 3)]


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no images found") as err:
        names_of(tmp_path / "empty")
    assert "\n" not in str(err.value)
    with pytest.raises(AnalysisError, match="no such folder"):
        names_of(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.jpg").write_bytes(jpeg(0))
    (bad / "1.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    _, items = analysis.image_source(str(bad))
    with pytest.raises(AnalysisError, match=r"1\.jpg: cannot be decoded as an image"):
        list(analysis.image_batches(items, 32, 10, 4))
    tar = tmp_path / "cut" / "x-000000.tar"
    tar.parent.mkdir()
    write_tar(tar, {"k0.jpg": jpeg(0, 200), "k1.jpg": jpeg(1, 200)})
    tar.write_bytes(tar.read_bytes()[:5000])                   # truncated mid-member
    with pytest.raises(AnalysisError, match="truncated or corrupt"):
        names_of(tar)
    with pytest.raises(AnalysisError, match="no split 'val'"):
        from jobs.make_shards import main as make_shards

        make_shards(["synthetic", "--out", str(tmp_path / "ds"), "--num-samples", "4",
                     "--num-classes", "2", "--image-size", "16"])
        names_of(tmp_path / "ds", "val")


@pytest.mark.s3
def test_shards_on_s3(s3, tmp_path):
    from pipeline import storage

    local = tmp_path / "s.tar"
    write_tar(local, {"k0.jpg": jpeg(0), "k1.jpg": jpeg(1)})
    storage.upload_file(local, f"s3://{s3}/data/train-000000.tar")
    storage.write_bytes(f"s3://{s3}/imgs/a/0.jpg", jpeg(2))
    assert [n.rsplit(":", 1)[1] for n in names_of(f"s3://{s3}/data")] == ["k0.jpg", "k1.jpg"]
    assert names_of(f"s3://{s3}/imgs") == [f"s3://{s3}/imgs/a/0.jpg"]
