"""pipeline/config.py, the config machinery of both commands: typed --set, dicts and files
with unknown keys and wrong types refused, old spellings read through the alias map."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from pipeline.config import Sectioned, apply_overrides, from_dict, load_config, parse_value
from pipeline.train.checkpoints import CheckpointConfig
from pipeline.train.config import PretrainConfig
from pipeline.train.fewshot import ProbeConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    decay: Literal["linear", "cosine"] = "linear"
    warmup_steps: int | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class Data:
    uri: str = ""
    shots: tuple[int, ...] = (1, 5)
    strict: bool = False


@dataclass(frozen=True)
class Config(Sectioned):
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)

    ALIASES: ClassVar[dict[str, str]] = {"lr": "optim.lr", "data": "data.uri",
                                         "optim.learning_rate": "optim.lr"}


def test_values_parse_as_their_types():
    assert parse_value("3e-4", float, "optim.lr") == 3e-4
    assert parse_value("1,10", tuple[int, ...], "data.shots") == (1, 10)
    assert parse_value("none", int | None, "k") is None
    assert parse_value("off", bool, "k") is False
    for raw, hint, message in (("x", int, "--set k=x: expected int"),
                               ("maybe", bool, "--set k=maybe: expected true or false"),
                               ("step", Literal["linear", "cosine"],
                                r"--set k=step: must be one of \['linear', 'cosine'\]")):
        with pytest.raises(ValueError, match=message):
            parse_value(raw, hint, "k")


def test_set_overrides_are_typed_and_checked_together():
    cfg = apply_overrides(Config(), ["optim.lr=0.5", "data.shots=2,4", "data.strict=true",
                                     "optim.warmup_steps=none"])
    assert (cfg.optim.lr, cfg.data.shots, cfg.data.strict) == (0.5, (2, 4), True)
    assert cfg.flat() == {"optim.lr": 0.5, "optim.decay": "linear", "optim.warmup_steps": None,
                          "data.uri": "", "data.shots": (2, 4), "data.strict": True}
    assert cfg.updated({"optim.lr": 0.25}).optim.lr == 0.25
    for items, message in ((["optim.lr"], "expected section.field=value"),
                           (["optimizer.lr=1"], r"unknown section 'optimizer'; sections are "
                                                r"\['optim', 'data'\]"),
                           (["optim.beta=1"], r"--set optim.beta: unknown key; optim has "
                                              r"\['decay', 'lr', 'warmup_steps'\]"),
                           (["optim.lr=-1"], "optim.lr must be positive")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(Config(), items)


def test_old_spellings_load_and_set_with_one_warning_line(caplog):
    with caplog.at_level(logging.WARNING, "pipeline.config"):
        cfg = from_dict(Config, {"lr": 0.5, "data": "s3://b/d", "optim": {"decay": "cosine"}})
        assert (cfg.optim.lr, cfg.optim.decay, cfg.data.uri) == (0.5, "cosine", "s3://b/d")
        assert "2 key(s) of an earlier release" in caplog.text
        # A section name that is also an old key: an object is the section, a value the key.
        assert from_dict(Config, {"data": {"uri": "x"}}).data.uri == "x"
        assert from_dict(Config, {"optim": {"learning_rate": 0.3}}).optim.lr == 0.3
        caplog.clear()
        assert apply_overrides(Config(), ["lr=0.2"]).optim.lr == 0.2
        assert caplog.messages == ["--set lr: an old spelling; write --set optim.lr=0.2"]
    with pytest.raises(ValueError, match="config keys 'lr' and 'optim.lr' both set optim.lr"):
        from_dict(Config, {"lr": 0.5, "optim": {"lr": 0.1}})


def test_dicts_refuse_unknown_keys_and_wrong_types():
    assert from_dict(Config, {"data": {"shots": [2, 3]}}).data.shots == (2, 3)
    assert from_dict(Config, {"optim": {"lr": 1}}).optim.lr == 1    # an int is a float
    for doc, message in (
            ({"optim": {"beta": 1}}, r"unknown config keys \['optim.beta'\]; optim has "
                                     r"\['decay', 'lr', 'warmup_steps'\]"),
            ({"model": {}}, r"unknown config keys \['model'\]; the config has sections "
                            r"\['optim', 'data'\]"),
            ({"optim": {"lr": "fast"}}, "config key optim.lr: expected float, got 'fast'"),
            ({"optim": {"decay": "step"}}, r"optim.decay: must be one of \['linear'"),
            ({"data": {"strict": 1}}, "config key data.strict: expected bool, got 1"),
            ({"data": {"shots": 5}}, "config key data.shots: expected a list, got 5"),
            ({"optim": 5}, "config key 'optim': expected a section")):
        with pytest.raises(ValueError, match=message):
            from_dict(Config, doc)


def test_config_files_say_what_is_wrong_with_them(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{")
    for name, message in (("missing.json", "cannot read it"), ("bad.json", "not JSON"),
                          ("list.json", "expected a JSON object of config sections")):
        with pytest.raises(ValueError, match=f"--config {tmp_path / name}: {message}"):
            load_config(Config, str(tmp_path / name))


def test_a_pretraining_config_of_an_earlier_release_loads_unchanged(caplog):
    """`vit-pretrain --show-config` of commit 87df5b9 (what its runs logged as config.json)
    loads to the same values, the keys that moved (the few-shot probe's `data.fewshot_*` and
    `train.fewshot_every`, the checkpoints' `train.checkpoint_*` and `train.keep_checkpoints`)
    read into their sections now, with one warning line; every other key prints as it was."""
    text = (FIXTURES / "config_v0_pretrain.json").read_text()
    with caplog.at_level(logging.WARNING, "pipeline.config"):
        cfg = load_config(PretrainConfig, str(FIXTURES / "config_v0_pretrain.json"))
    assert "9 key(s) of an earlier release" in caplog.text
    assert (cfg.optim.lr, cfg.train.total_steps, cfg.run.name) == (3e-3, 200, "old-run")
    assert cfg.probe == ProbeConfig(every=50, sets=(), split="val", shots=(1, 10), images=1000)
    assert cfg.checkpoint == CheckpointConfig(every=50, minutes=0.0, asynchronous=True, keep=2)
    old, new = json.loads(text), json.loads(cfg.to_json())
    moved = {k for k in PretrainConfig.ALIASES if k.partition(".")[0] in old}
    for section, values in old.items():
        for key, value in values.items():
            if f"{section}.{key}" in moved:
                target, _, name = PretrainConfig.ALIASES[f"{section}.{key}"].partition(".")
                assert new[target][name] == value, key
            else:
                assert new[section][key] == value, f"{section}.{key}"
    assert PretrainConfig.from_dict(new) == cfg        # what it writes now reads back


def test_old_pretraining_keys_still_set_with_a_deprecation_line(caplog):
    from pipeline.train.config import apply_overrides, smoke

    with caplog.at_level(logging.WARNING, "pipeline.config"):
        cfg = apply_overrides(smoke(), ["data.fewshot_sets=a=/x", "train.fewshot_every=7",
                                        "train.keep_checkpoints=5"])
    assert (cfg.probe.sets, cfg.probe.every, cfg.checkpoint.keep) == (("a=/x",), 7, 5)
    assert caplog.messages == [
        "--set data.fewshot_sets: an old spelling; write --set probe.sets=a=/x",
        "--set train.fewshot_every: an old spelling; write --set probe.every=7",
        "--set train.keep_checkpoints: an old spelling; write --set checkpoint.keep=5"]
