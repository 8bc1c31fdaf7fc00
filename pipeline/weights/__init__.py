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

import importlib

# name -> the submodule that defines it, imported on first use (PEP 562): `from pipeline.weights
# import CheckpointError` (or importing `pipeline.weights.integrity`) does not load torch, which
# the command's driver and Ray Train's controller never need.
_WHERE = {
    "CheckpointError": "errors", "HUB_SCHEME": "hub", "resolve_checkpoint": "resolve",
    **dict.fromkeys(("CONFIG_FILE", "WEIGHTS_FILE", "read_metadata", "save_vit",
                     "write_weights"), "ours"),
    **dict.fromkeys(("EXPORT_FORMATS", "FORMATS", "export_recipe", "export_vit", "load_vit"),
                    "registry"),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
