"""Typed run configurations, one mechanism for both commands.

A run's config is a frozen dataclass of sections (pretraining: `model`, `optim`, `data`,
`train`, `scale`, `run`, `checkpoint`, `probe`; VTAB: `finetune`, `sweep`, `data`, `run`),
each section a frozen dataclass beside the code it configures, the top level composing them
(`Sectioned`):

    cfg = apply_overrides(preset(), ["optim.lr=3e-4"])   # --set section.key=value, typed
    cfg = load_config(PretrainConfig, "config.json")      # --config FILE (MLflow's config.json)
    print(cfg.to_json())                                  # --show-config
    params = cfg.flat()                                   # {"optim.lr": 0.0003, ...}

Unknown keys and wrong types are errors that name the keys there are. A top-level config's
`ALIASES` maps old spellings (the flat keys of an older release, say) to their section keys,
so that the configs old runs logged still load, and old `--set` spellings still work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from collections.abc import Callable
from typing import ClassVar, Literal

log = logging.getLogger("pipeline.config")


class Sectioned:
    """What a top-level config (a frozen dataclass whose fields are section dataclasses)
    shares: JSON in and out, the flat view MLflow takes, typed updates."""

    # Old key ("steps", or a dotted "optim.learning_rate") -> its "section.key" now.
    ALIASES: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict):
        return from_dict(cls, doc)

    def flat(self) -> dict[str, object]:
        """{"optim.lr": 0.001, ...}: every resolved value, for MLflow params."""
        out = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def updated(self, values: dict[str, object]):
        """A copy with {"section.key": value} changed (typed values; every check runs
        again, the cross-section ones on the final values)."""
        sections: dict[str, dict] = {}
        for key, value in values.items():
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        return dataclasses.replace(self, **{
            section: dataclasses.replace(getattr(self, section), **changes)
            for section, changes in sections.items()})


# ---------------------------------------------------------------------------------------------
# --set key=value
# ---------------------------------------------------------------------------------------------
class BadValue(ValueError):
    """A value that is not of its key's type; `reason` says why ("expected int")."""

    def __init__(self, key: str, raw: str, reason: str):
        super().__init__(f"--set {key}={raw}: {reason}")
        self.key, self.raw, self.reason = key, raw, reason


def parse_value(raw: str, hint, key: str):
    """`raw` (a --set value) as the type `hint` says; `key` names it in errors.
    Tuples are comma-separated ("0.01,0.03"); "none" sets an optional value to None."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(raw, inner[0], key)
    if origin is Literal:
        if raw not in args:
            raise BadValue(key, raw, f"must be one of {list(args)}")
        return raw
    if origin is tuple:
        return tuple(parse_value(x, args[0], key) for x in raw.split(",") if x)
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise BadValue(key, raw, "expected true or false")
    try:
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise BadValue(key, raw, f"expected {hint.__name__}") from None
    if hint is str:
        return raw
    raise ValueError(f"--set {key}: cannot set a value of type {hint}")


def hint_of(cls: type, key: str):
    """The type of "section.key" in the top-level config class `cls`."""
    section, _, name = key.partition(".")
    return typing.get_type_hints(typing.get_type_hints(cls)[section])[name]


def apply_overrides(cfg: Sectioned, items: list[str],
                    setters: dict[str, Callable[[object, str], object]] | None = None):
    """Apply `section.key=value` overrides, all at once (the cross-section checks see the
    final values, whatever the order given; a key given twice: the last wins). Unknown keys
    and wrong types are errors. `setters` handle keys that set several values at once
    ({"model.variant": (section, raw) -> section}), before the plain keys of their section."""
    setters = setters or {}
    aliases = type(cfg).ALIASES
    names = [f.name for f in dataclasses.fields(cfg)]
    sections: dict[str, dict[str, str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in aliases:
            log.warning("--set %s: an old spelling; write --set %s=%s", key, aliases[key], raw)
            key = aliases[key]
        section, _, name = key.partition(".")
        if not dataclasses.is_dataclass(getattr(cfg, section, None)) or not name:
            raise ValueError(f"--set {key}: unknown section {section!r}; sections are {names}")
        sections.setdefault(section, {})[name] = raw
    changes = {}
    for section, values in sections.items():
        current = getattr(cfg, section)
        hints = typing.get_type_hints(type(current))
        for name in [n for n in values if f"{section}.{n}" in setters]:
            current = setters[f"{section}.{name}"](current, values.pop(name))
        known = [f.name for f in dataclasses.fields(current)]
        updates = {}
        for name, raw in values.items():
            if name not in known:
                raise ValueError(f"--set {section}.{name}: unknown key; {section} has "
                                 f"{sorted(known)}")
            updates[name] = parse_value(raw, hints[name], f"{section}.{name}")
        changes[section] = dataclasses.replace(current, **updates)
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------
# Dicts and files: --config FILE, the config.json of a run
# ---------------------------------------------------------------------------------------------
def from_dict(cls: type, doc: dict):
    """A `cls` (a Sectioned dataclass) from {section: {key: value}} as `to_dict` writes it;
    keys of `cls.ALIASES` (an older release's spellings) are read as their section keys.
    Missing keys keep their defaults; unknown keys and values of the wrong type are errors."""
    aliases = getattr(cls, "ALIASES", {})
    sections = [f.name for f in dataclasses.fields(cls)]
    nested: dict[str, dict] = {}
    given: dict[str, str] = {}          # section key -> the key it was given as
    unknown, old = [], []

    def put(key: str, target: str, value) -> None:
        if target in given:
            raise ValueError(f"config keys {given[target]!r} and {key!r} both set {target}; "
                             f"keep one")
        given[target] = key
        section, _, name = target.partition(".")
        nested.setdefault(section, {})[name] = value

    for key, value in doc.items():
        if key in sections and isinstance(value, dict):
            for name, v in value.items():
                dotted = f"{key}.{name}"
                if dotted in aliases:
                    old.append(dotted)
                put(dotted, aliases.get(dotted, dotted), v)
        elif key in aliases:
            old.append(key)
            put(key, aliases[key], value)
        elif key in sections:
            raise ValueError(f"config key {key!r}: expected a section (an object of keys), "
                             f"got {value!r}")
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; the config has sections "
                         f"{sections}")
    if old:
        log.warning("config: %d key(s) of an earlier release read by their names now (%s)",
                 len(old), ", ".join(f"{k} -> {aliases[k]}" for k in old[:3])
                 + (", ..." if len(old) > 3 else ""))
    return _build(cls, nested, "")


def _build(cls, d: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(prefix + k for k in unknown)}; "
                         f"{prefix.rstrip('.') or 'the config'} has {sorted(known)}")
    kwargs = {}
    for name in known:
        if name not in d:
            continue
        value, hint = d[name], hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config key {prefix}{name!r}: expected a section (an object "
                                 f"of keys), got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _typed(value, hint, prefix + name)
    return cls(**kwargs)


def _typed(value, hint, key: str):
    """A JSON value as the field's type: lists become tuples; a wrong type is an error.
    (An int stays an int in a float field, so that a config written again is the same.)"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(value, [a for a in args if a is not type(None)][0], key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key}: expected a list, got {value!r}")
        return tuple(_typed(v, args[0], key) for v in value)
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(hint)
    if expected and (not isinstance(value, expected) or
                     (hint is not bool and isinstance(value, bool))):
        raise ValueError(f"config key {key}: expected {hint.__name__}, got {value!r}")
    return value


def load_config(cls: type, uri: str):
    """A `cls` from a JSON file (local or s3://), as --show-config prints it and MLflow keeps
    it (config.json); one-line errors that name the file."""
    from pipeline import storage

    try:
        doc = json.loads(storage.read_bytes(uri))
    except (storage.StorageError, OSError) as err:
        raise ValueError(f"--config {uri}: cannot read it ({str(err).splitlines()[0]})") \
            from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {uri}: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--config {uri}: expected a JSON object of config sections")
    return from_dict(cls, doc)
