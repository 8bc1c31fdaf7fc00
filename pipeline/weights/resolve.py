"""What a `--checkpoint` names -> the weights to load.

`vit-vtab`, `vit-export`, `vit-analyze` and the demo take a pretraining run's folder, one of
its step folders, a checkpoint in any format `load_vit` reads, or `hf://org/name`.
"""

from __future__ import annotations

import logging

from pipeline.weights.hub import HUB_SCHEME
from pipeline.weights.integrity import complete_checkpoints, verify
from pipeline.weights.ours import CONFIG_FILE, WEIGHTS_FILE, read_metadata

log = logging.getLogger("pipeline.weights")


def resolve_checkpoint(uri: str) -> str:
    """A pretraining run's folder (`<storage>/<run name>`) stands for its newest complete
    checkpoint whose weights match their checksums (a damaged one is passed over with a
    warning); anything else (a step folder, another format, hf://...) is taken as it is."""
    if uri.startswith(HUB_SCHEME) or "/" not in uri.rstrip("/") or read_metadata(uri):
        return uri
    for newest in complete_checkpoints(uri.rstrip("/")):
        problem = verify(newest, only=(WEIGHTS_FILE, CONFIG_FILE))
        if problem is None:
            log.info("%s is a pretraining run: using its newest checkpoint %s", uri, newest)
            return newest
        log.warning("checkpoint %s is damaged (%s): trying the previous one", newest, problem)
    return uri
