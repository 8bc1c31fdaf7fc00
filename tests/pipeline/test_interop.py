"""Our exports loaded by timm and transformers themselves, as their users load weights.

Our side (this venv) writes a model, runs `vit-export` on it and keeps the Python it prints;
the other side is a separate interpreter with timm and transformers (`make interop-env`
builds `.venv-interop`: timm needs torchvision, which needs PyPI's CUDA torch, not the CPU
torch here), which runs that Python exactly as printed, then our inputs through the model it
built. The logits must agree to 1e-4, with the class count ours (timm drops a head whose
class count differs from its pretrained config's, without a word). Without the interpreter
every test here skips, naming the command that builds it; `VIT_INTEROP_PYTHON` points at
another one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.model import ViT, ViTConfig
from pipeline.weights import save_vit
from tests.pipeline.test_export import fill_hub_cache, trained_like

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("VIT_INTEROP_PYTHON") or ROOT / ".venv-interop" / "bin" / "python")

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(scope="module")
def interop_python() -> str:
    if not PYTHON.exists():
        pytest.skip(f"no interpreter with timm and transformers at {PYTHON}: run `make "
                    f"interop-env` (or set VIT_INTEROP_PYTHON)")
    return str(PYTHON)


def export(tmp_path: Path, model: ViT, fmt: str) -> tuple[Path, str]:
    """`vit-export` on a saved `model` -> (the export folder, the Python it printed)."""
    save_vit(model, tmp_path / "ours")
    out = tmp_path / f"export-{fmt}"
    done = subprocess.run([sys.executable, "-m", "jobs.export", "--checkpoint",
                           str(tmp_path / "ours"), "--out", str(out), "--format", fmt],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    head, _, recipe = done.stdout.partition("load it with:\n")
    assert head.startswith("exported ") and recipe, done.stdout
    return out, textwrap.dedent(recipe)


def run_theirs(python: str, tmp_path: Path, recipe: str, x: torch.Tensor,
               output: str = "model(x)", env: dict | None = None) -> dict:
    """Run `recipe` (which must bind `model`) in the other interpreter, then `output` on
    our inputs `x`; -> {"y": their output, "num_classes": their class count or -1}."""
    save_file({"x": x}, tmp_path / "x.safetensors")
    script = recipe + textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        x = load_file({str(tmp_path / "x.safetensors")!r})["x"]
        with torch.no_grad():
            y = {output}
        save_file({{"y": y.contiguous()}}, {str(tmp_path / "theirs.safetensors")!r})
        print("num_classes", getattr(model, "num_classes", getattr(model, "num_labels", -1)))
        """)
    done = subprocess.run([python, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": "",
                                             "HF_HUB_OFFLINE": "1", **(env or {})})
    assert done.returncode == 0, f"{script}\n{done.stderr[-3000:]}"
    found = re.search(r"^num_classes (-?\d+)$", done.stdout, re.M)
    return {"y": load_file(tmp_path / "theirs.safetensors")["y"],
            "num_classes": int(found.group(1))}


def assert_same_logits(theirs: dict, model: ViT, x: torch.Tensor) -> None:
    with torch.no_grad():
        ours = model(x)
    assert theirs["num_classes"] == model.cfg.num_classes
    assert theirs["y"].shape == ours.shape
    assert ours.abs().max() > 0.1, "the logits compared are not trivially small"
    diff = (theirs["y"] - ours).abs().max().item()
    assert diff < 1e-4, f"their logits differ from ours by {diff}"


# ---- timm ---------------------------------------------------------------------------------
SMOKE = dict(patch_size=8, hidden_size=64, depth=2, num_heads=2, mlp_dim=128, image_size=32)
TIMM_CASES = {
    # A shape timm knows by name, with a class count other than its pretrained config's.
    "standard": (ViTConfig.from_variant("Ti/16", num_classes=10), "vit_tiny_patch16_224"),
    # The smoke preset's model: no timm name; an entry point and model_args.
    "non-standard": (ViTConfig(**SMOKE, num_classes=10), "vit_base_patch16_224"),
    "gap": (ViTConfig(**SMOKE, num_classes=7, pool="gap"), "vit_base_patch16_224"),
    # R50's ResNet (3, 4, 9 units: the /16 map of R50+B/16) under a small encoder.
    "hybrid": (ViTConfig.from_variant("R50+B/16", num_classes=5, image_size=64, depth=2,
                                      hidden_size=64, num_heads=2, mlp_dim=128),
               "vit_base_r50_s16_224"),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_loads_the_export_with_our_logits(interop_python, tmp_path, case):
    cfg, architecture = TIMM_CASES[case]
    model = trained_like(cfg)
    out, recipe = export(tmp_path, model, "timm")
    assert recipe == (f"import timm\nmodel = timm.create_model('local-dir:{out}', "
                      f"pretrained=True).eval()\n")
    assert json.loads((out / "config.json").read_text())["architecture"] == architecture
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(1))
    assert_same_logits(run_theirs(interop_python, tmp_path, recipe, x), model, x)


def test_every_name_the_timm_export_writes_is_timms_and_builds_that_shape(interop_python,
                                                                           tmp_path):
    """`pipeline.weights.timm._NAMED` against timm's registry: each name builds our variant
    at its pooling and image size (the bases only have to exist: model_args override)."""
    from pipeline.weights import timm as ours

    names = sorted({*ours._NAMED, ours._PLAIN_BASE, *ours._HYBRID_BASES.values()})
    script = textwrap.dedent(f"""
        import json, timm, torch
        shapes = {{}}
        for name in {names!r}:
            with torch.device("meta"):
                m = timm.create_model(name)
            backbone = getattr(m.patch_embed, "backbone", None)
            shapes[name] = dict(
                hidden_size=m.embed_dim, depth=len(m.blocks),
                mlp_dim=m.blocks[0].mlp.fc1.out_features, num_heads=m.blocks[0].attn.num_heads,
                image_size=m.patch_embed.img_size[0], patch_size=m.patch_embed.patch_size[0],
                pool="token" if m.cls_token is not None and m.global_pool == "token" else "gap",
                resnet_layers=None if backbone is None else
                    [len(s.blocks) for s in getattr(backbone, "stages", [])])
        print(json.dumps(shapes))
        """)
    done = subprocess.run([interop_python, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    shapes = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (variant, pool, image_size) in ours._NAMED.items():
        cfg = ViTConfig.from_variant(variant, pool=pool, image_size=image_size)
        want = {k: getattr(cfg, k) for k in shapes[name] if k != "resnet_layers"}
        got = {k: v for k, v in shapes[name].items() if k != "resnet_layers"}
        assert got == want, name
        layers = shapes[name]["resnet_layers"]
        assert (None if layers is None else tuple(layers)) == cfg.resnet_layers, name
    for layers, name in ours._HYBRID_BASES.items():
        assert tuple(shapes[name]["resnet_layers"]) == layers, name


def readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"one README python block with {containing!r}, found {len(found)}"
    return found[0]


def test_timm_loads_the_export_by_hand_as_the_readme_shows(interop_python, tmp_path):
    """The README's recipes: the printed one (with OUT for the folder), and the explicit
    `create_model(architecture, pretrained_cfg_overlay=..., **model_args)` form."""
    model = trained_like(ViTConfig(**SMOKE, num_classes=10), seed=3)
    out, recipe = export(tmp_path, model, "timm")
    assert readme_block("local-dir:OUT") == recipe.replace(str(out), "OUT")
    by_hand = readme_block("pretrained_cfg_overlay").replace("OUT", str(out))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_same_logits(run_theirs(interop_python, tmp_path, by_hand, x), model, x)


def test_timm_loads_the_export_from_the_hub(interop_python, tmp_path):
    """The folder uploaded to the Hub as it is: timm's `hf-hub:` loader, offline, reads it
    from huggingface_hub's cache (filled as a download leaves it)."""
    cfg = ViTConfig(**SMOKE, num_classes=7, pool="gap")
    model = trained_like(cfg, seed=4)
    out, _ = export(tmp_path, model, "timm")
    fill_hub_cache(tmp_path / "cache", "acme/smoke-timm", out)
    recipe = "import timm\nmodel = timm.create_model('hf-hub:acme/smoke-timm', pretrained=True)\n"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    theirs = run_theirs(interop_python, tmp_path, recipe + "model.eval()\n", x,
                        env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert_same_logits(theirs, model, x)


# ---- transformers -------------------------------------------------------------------------
def test_transformers_loads_the_hf_export_with_our_logits(interop_python, tmp_path):
    model = trained_like(ViTConfig(**SMOKE, num_classes=10))
    out, recipe = export(tmp_path, model, "hf")
    assert recipe == ("from transformers import ViTForImageClassification\nmodel = "
                      f"ViTForImageClassification.from_pretrained('{out}').eval()\n")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_same_logits(run_theirs(interop_python, tmp_path, recipe, x,
                                  "model(pixel_values=x).logits"), model, x)


def test_transformers_pooler_is_our_pre_logits(interop_python, tmp_path):
    """A model with the tanh pre-logits layer: a ViTModel whose pooler output is ours."""
    model = trained_like(ViTConfig(**SMOKE, num_classes=10, representation_size=24))
    out, recipe = export(tmp_path, model, "hf")
    assert "from transformers import ViTModel\n" in recipe
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    theirs = run_theirs(interop_python, tmp_path, recipe, x,
                        "model(pixel_values=x).pooler_output")
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
    assert theirs["y"].shape == ours.shape == (2, 24)
    assert (theirs["y"] - ours).abs().max().item() < 1e-4
