"""The error every weight reader raises, and how its messages list tensor names."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with one line naming the problem."""


def short_keys(keys: list[str], n: int = 8) -> str:
    """The first `n` of `keys` for a one-line message (a ViT has hundreds)."""
    shown = ", ".join(keys[:n])
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return f"[{shown}{more}]"
