"""The registry of weight formats: what it names, what it refuses, and that every format that
writes reads its own output back, detected as itself. The formats' conversions are tested
against independent references in tests/pipeline/test_checkpoint.py, test_export.py and
test_hybrid.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import ViT, ViTConfig
from pipeline.weights import EXPORT_FORMATS, FORMATS, CheckpointError, export_vit, save_vit
from pipeline.weights.jax import from_jax
from pipeline.weights.registry import read
from tests.pipeline.test_checkpoint import vit_jax_params

SMALL = dict(patch_size=8, hidden_size=48, depth=2, num_heads=3, mlp_dim=96, image_size=32,
             num_classes=5)


def test_every_format_hook_comes_with_its_reader():
    """A format that claims an input must be able to read it, and names are unique."""
    assert len({f.name for f in FORMATS}) == len(FORMATS)
    for f in FORMATS:
        assert (f.claims_dir is None) == (f.read_dir is None), f.name
        assert bool(f.suffixes) == (f.read_file is not None), f.name
        assert (f.claims_keys is None) == (f.to_ours is None), f.name
    assert EXPORT_FORMATS == ("hf", "timm")


@pytest.mark.parametrize("name", ["onnx", "jax", "vit-pipeline", "HF"])
def test_a_format_that_cannot_be_written_is_one_line_naming_those_that_can(tmp_path, name):
    """An unknown name, and a known format without an exporter (the authors' .npz, ours, which
    `save_vit` writes), get the same line; nothing is read or written."""
    with pytest.raises(CheckpointError) as err:
        export_vit(tmp_path / "absent", tmp_path / "out", name)
    assert str(err.value) == f"unknown export format {name!r}; use one of hf, timm"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_each_export_reads_back_as_its_own_format_with_the_same_weights(tmp_path, fmt):
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL))
    save_vit(model, tmp_path / "ours")
    export_vit(tmp_path / "ours", tmp_path / fmt, fmt)
    loaded = read(tmp_path / fmt, str(tmp_path / fmt))
    label = next(f.label for f in FORMATS if f.name == fmt)
    assert loaded.source == label
    assert set(loaded.state) == set(model.state_dict())
    assert all(torch.equal(loaded.state[k], v) for k, v in model.state_dict().items())


# ---- the authors' .npz: each refusal is one line naming the array or the part ---------------
def test_npz_missing_array_is_named():
    params = vit_jax_params(np.random.default_rng(0))
    del params["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    with pytest.raises(CheckpointError, match=r"^x\.npz \(vit_jax\): missing keys "
                       r"\[Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias\]$"):
        from_jax(params, "x.npz")


def test_npz_block_without_its_parts_is_refused():
    params = vit_jax_params(np.random.default_rng(0))
    params = {k: v for k, v in params.items()
              if not k.startswith("Transformer/encoderblock_1/LayerNorm_2/")}
    with pytest.raises(CheckpointError, match=r"block 1 has parts \['LayerNorm_0', "
                       r"'MlpBlock_3', 'MultiHeadDotProductAttention_1'\], expected two "
                       r"LayerNorms"):
        from_jax(params, "x.npz")


def test_npz_big_vision_map_head_and_sincos_are_refused():
    params = {f"params/img/{k}": v for k, v in vit_jax_params(np.random.default_rng(0)).items()
              if k != "Transformer/posembed_input/pos_embedding"}
    with pytest.raises(CheckpointError, match=r"x\.npz \(big_vision\): no learned "
                       r"pos_embedding \(sincos"):
        from_jax(params, "x.npz")
    with pytest.raises(CheckpointError, match="'map' pooling is not supported"):
        from_jax({**params, "params/img/MAPHead_0/probe": np.zeros((1, 1, 48))}, "x.npz")


def test_npz_text_tower_is_dropped_and_non_vit_refused():
    """A two-tower model (LiT, SigLIP): the image tower is read, the text tower ignored."""
    params = vit_jax_params(np.random.default_rng(0))
    two = {**{f"params/img/{k}": v for k, v in params.items()},
           "params/txt/Embed_0/embedding": np.zeros((3, 4), np.float32)}
    state, fields, source = from_jax(two, "x.npz")
    assert source == "vit_jax" and fields == {"num_heads": 3}
    assert torch.equal(state["blocks.1.attn.proj.bias"], torch.from_numpy(
        params["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/bias"]))
    with pytest.raises(CheckpointError, match=r"^x\.npz is not a ViT checkpoint: no "
                       r"embedding/kernel among \[conv1/kernel, fc/kernel\]$"):
        from_jax({"conv1/kernel": np.zeros(3), "fc/kernel": np.zeros(3)}, "x.npz")
