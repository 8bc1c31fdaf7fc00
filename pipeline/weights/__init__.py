"""ViT weights: our format, the formats people have, and what a checkpoint name stands for.

    ours.py      our format (model.safetensors + vit.json): `save_vit`, `read_metadata`
    hf.py        Hugging Face transformers' ViT, import and export
    timm.py      timm's `vit_*`, import and export
    jax.py       the authors' .npz (vit_jax, big_vision), import
    registry.py  the list of formats; `load_vit` detects one from the files, `export_vit`
                 writes one
    build.py     a state dict in our names -> a ViT (config from the shapes, strict load)
    files.py     reading tensor files without unpickling anything
    hub.py       `hf://org/name`, through the Hugging Face cache
    resolve.py   a run folder -> its newest complete, intact checkpoint
    integrity.py which checkpoints of a run are complete and intact

Nothing here imports Ray or the training code (tests/test_layout.py): evaluation, export and
analysis read weights without them. Nothing is unpickled: safetensors,
`torch.load(weights_only=True)`, `np.load(allow_pickle=False)`, and DCP metadata through an
allow-list.
"""

from pipeline.weights.errors import CheckpointError
from pipeline.weights.hub import HUB_SCHEME
from pipeline.weights.ours import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_metadata,
    save_vit,
    write_weights,
)
from pipeline.weights.registry import (
    EXPORT_FORMATS,
    FORMATS,
    export_recipe,
    export_vit,
    load_vit,
)
from pipeline.weights.resolve import resolve_checkpoint

__all__ = ["CONFIG_FILE", "EXPORT_FORMATS", "FORMATS", "HUB_SCHEME", "WEIGHTS_FILE",
           "CheckpointError", "export_recipe", "export_vit", "load_vit", "read_metadata",
           "resolve_checkpoint", "save_vit", "write_weights"]
