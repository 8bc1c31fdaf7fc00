"""The evaluation config across releases: the flat config.json of an earlier release loads
with the same values, and the same command finds the same evaluation name (what makes it
resume). The fixture is `vit-vtab --show-config` of commit 87df5b9, before sections."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from eval.config import VtabConfig
from eval.vtab import config_from, parse_args
from pipeline.config import load_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HF = "hf://google/vit-base-patch16-224-in21k"   # named without reading anything


def test_the_flat_config_of_an_earlier_release_loads_with_the_same_values(caplog):
    old = json.loads((FIXTURES / "config_v0_vtab.json").read_text())
    with caplog.at_level(logging.WARNING, "pipeline.config"):
        cfg = load_config(VtabConfig, str(FIXTURES / "config_v0_vtab.json"))
    assert "19 key(s) of an earlier release" in caplog.text
    # Every old key, through the alias map, holds the value it held.
    values = cfg.flat()
    for key, new in VtabConfig.ALIASES.items():
        value = values[new]
        assert (list(value) if isinstance(value, tuple) else value) == old[key], key
    assert set(old) == set(VtabConfig.ALIASES)
    # Today's form of it loads to the same config, as --config and --show-config do.
    assert VtabConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # The name it ran under (computed by 87df5b9 for this config): a rerun resumes it.
    assert cfg.run_name == "vtab-google-vit-base-patch16-224-in21k-7354631e"


@pytest.mark.parametrize("args, name", [
    ([], "bc637300"),
    (["--reference", "vit-l16-i21k"], "2256b6f5"),
    (["--preset", "demo", "--tasks", "dtd", "--warmup-steps", "5"], "1e5e3985"),
    (["--protocol", "per-task", "--lrs", "0.01,0.1", "--steps", "100", "--dropout", "0.2",
      "--micro-batch-size", "8", "--resolution", "224", "--gpus-per-trial", "1",
      "--out", "/x", "--max-concurrent-trials", "2"], "32b571e3"),
])
def test_the_same_command_names_the_same_evaluation_as_before(args, name):
    """The names 87df5b9 gave these commands: an evaluation interrupted before the config
    had sections resumes under today's code."""
    cfg = config_from(parse_args(["--checkpoint", HF, "--data", "s3://bucket/vtab-1k", *args]))
    assert cfg.run_name == f"vtab-google-vit-base-patch16-224-in21k-{name}"


def test_a_key_added_since_changes_the_name_only_off_its_default():
    base = ["--checkpoint", HF, "--data", "s3://bucket/vtab-1k"]
    default = config_from(parse_args(base))
    same = config_from(parse_args([*base, "--set", "finetune.momentum=0.9"]))
    other = config_from(parse_args([*base, "--set", "finetune.momentum=0.8"]))
    assert same.run_name == default.run_name != other.run_name
    assert other.changed_recipe() == {"momentum": 0.8} and default.changed_recipe() == {}
    # Where trials run is not what they compute: no new name.
    moved = config_from(parse_args([*base, "--gpus-per-trial", "1", "--out", "/y"]))
    assert moved.run_name == default.run_name


def test_config_file_then_set_and_flags(tmp_path):
    """--config starts from a file (its checkpoint and data too); --set and the flags apply
    on top; --preset beside it is refused."""
    cfg = config_from(parse_args(["--config", str(FIXTURES / "config_v0_vtab.json"),
                                  "--set", "finetune.steps=50", "--seeds", "2"]))
    assert (cfg.finetune.steps, cfg.sweep.seeds, cfg.run.checkpoint, cfg.data.uri) == (
        50, 2, HF, "s3://bucket/vtab-1k")
    (tmp_path / "new.json").write_text(cfg.to_json())
    assert config_from(parse_args(["--config", str(tmp_path / "new.json")])) == cfg
    for args, message in (
            (["--config", str(tmp_path / "new.json"), "--preset", "demo"],
             "--config and --preset both name a starting configuration"),
            (["--data", "d"], "no checkpoint to evaluate: give --checkpoint")):
        with pytest.raises(ValueError, match=message):
            config_from(parse_args(args))


def test_preset_costs_are_their_fine_tuning_flops():
    """Each preset's "about N H100-hours for ViT-B/16 and M for L/16": its fine-tuning runs'
    training FLOPs at the preset's resolution, at 40% of an H100's bf16 peak."""
    import re

    from eval.config import PRESETS
    from pipeline.model import ViTConfig
    from pipeline.perf import PEAK_BF16, train_flops_per_image

    for name in ("vit", "per-task", "paper"):
        preset = PRESETS[name]
        cfg = preset()
        found = re.search(r"about (\d+) H100-hours for ViT-B/16 and (\d+) for L/16 at 40% MFU",
                          " ".join((preset.__doc__ or "").split()))
        assert found, name
        s, f = cfg.sweep, cfg.finetune
        runs = len(s.tasks) * ((len(s.lrs) if len(s.lrs) > 1 else 0) + s.seeds)
        for variant, stated in zip(("B/16", "L/16"), found.groups(), strict=True):
            flops = train_flops_per_image(ViTConfig.from_variant(variant,
                                                                 image_size=f.resolution))
            hours = runs * f.steps * f.batch_size * flops / (PEAK_BF16["H100"] * 0.4) / 3600
            assert int(stated) == pytest.approx(hours, rel=0.05), (name, variant)
