"""Which checkpoints of a pretraining run are complete and intact: the read side of the
layout pipeline/train/checkpoints.py writes (described there in full).

    <run folder>/step_<step:08d>/
        model.safetensors, vit.json   the ViT in our format (pipeline/weights/ours.py)
        state/.metadata, state/__<rank>_0.distcp, state/sha256_rank<r>.json
                                      the sharded training state (DCP), per-rank checksums
        train_state.json              written last: step, config, and the size and SHA-256
                                      of every file rank 0 wrote
        corrupt.json                  beside a checkpoint that failed `verify`

It lives with the weights because readers of weights need it: a run folder given as
`--checkpoint` stands for its newest checkpoint that is complete (`is_complete`: every file
there with its size) and intact (`verify`: the weights match their recorded SHA-256), and
evaluation must not import the training code to find it. Training imports it from here.

Nothing is unpickled beyond DCP's own metadata classes: `.metadata` is a pickle, read
through an allow-list of exact (module, name) pairs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle

from pipeline import storage

log = logging.getLogger("pipeline.weights")

STATE_FORMAT = "vit-pipeline-train"     # train_state.json's "format"
STATE_DIR = "state"                     # the DCP checkpoint
STATE_FILE = "train_state.json"
METADATA_FILE = f"{STATE_DIR}/.metadata"
CORRUPT_FILE = "corrupt.json"           # written beside a checkpoint that failed `verify`
STEP_PREFIX = "step_"
HASH_CHUNK = 8 << 20


def read_state(uri: str) -> dict:
    """The train_state.json of the checkpoint at `uri`."""
    doc = json.loads(storage.read_bytes(storage.join(uri, STATE_FILE)))
    if doc.get("format") != STATE_FORMAT:
        raise ValueError(f"{STATE_FILE} is not of format {STATE_FORMAT!r}")
    return doc


def listing(uri: str) -> dict[str, int]:
    """{relative path: size} of every file under `uri` (one recursive listing)."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as err:
        raise storage.StorageError(f"cannot list {uri}: {first_line(err)}") from None
    root = root.rstrip("/") + "/"
    return {i.path[len(root):]: i.size for i in infos if i.type == pafs.FileType.File}


def is_complete(uri: str, files: dict[str, int] | None = None) -> bool:
    """Every file of the checkpoint at `uri` is there with its full size. `files`: a listing
    of `uri` taken already ({relative path: size})."""
    files = listing(uri) if files is None else files
    if STATE_FILE not in files or METADATA_FILE not in files or CORRUPT_FILE in files:
        return False
    try:
        doc = read_state(uri)
        needed = dcp_extents(uri)
    except (storage.StorageError, OSError, ValueError, pickle.UnpicklingError, EOFError):
        return False
    for name, size in doc.get("files", {}).items():
        if files.get(name) != size:
            return False
    if "sha256" in doc and not all(rank_sums(r) in files for r in range(doc["world_size"])):
        return False
    return all(files.get(name, -1) >= end for name, end in needed.items())


def complete_checkpoints(run_uri: str, warn: bool = True):
    """The run's complete checkpoints, newest first (one listing of the run folder).
    Incomplete ones (an upload cut off by a kill) are skipped, with a warning unless `warn`
    is off (retention, which runs while other ranks' uploads are in flight)."""
    try:
        files = listing(run_uri)
    except storage.StorageError:
        return
    by_step: dict[str, dict[str, int]] = {}
    for path, size in files.items():
        top, _, rest = path.partition("/")
        if top.startswith(STEP_PREFIX) and rest:
            by_step.setdefault(top, {})[rest] = size
    for name in sorted(by_step, reverse=True):
        uri = storage.join(run_uri, name)
        if is_complete(uri, by_step[name]):
            yield uri
        elif not warn:
            continue
        elif CORRUPT_FILE in by_step[name]:
            log.warning("skipping checkpoint %s: marked damaged (%s)", uri, CORRUPT_FILE)
        else:
            log.warning("skipping incomplete checkpoint %s (files missing or truncated)", uri)


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------
def rank_sums(rank: int) -> str:
    """The file holding the SHA-256 of the DCP files rank `rank` wrote."""
    return f"{STATE_DIR}/sha256_rank{rank}.json"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_uri(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    digest = hashlib.sha256()
    with storage.open_read(fs, path) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(uri: str) -> dict[str, str]:
    """{relative path: SHA-256} that the checkpoint at `uri` recorded for its files (rank 0's
    in train_state.json, each rank's DCP files in its sidecar); {} for a checkpoint written
    before checksums were recorded."""
    doc = read_state(uri)
    if "sha256" not in doc:
        return {}
    sums = dict(doc["sha256"])
    for rank in range(doc["world_size"]):
        part = json.loads(storage.read_bytes(storage.join(uri, rank_sums(rank))))
        sums.update({f"{STATE_DIR}/{name}": h for name, h in part.items()})
    return sums


def verify(uri: str, only: tuple[str, ...] | None = None) -> str | None:
    """Recompute the SHA-256 of the checkpoint's files (or of those named in `only`) and
    compare them with the recorded ones. -> None if they match, else what differs."""
    try:
        sums = checksums(uri)
    except (storage.StorageError, OSError, ValueError, KeyError) as err:
        return f"its checksums cannot be read ({first_line(err)})"
    for name, expected in sorted(sums.items()):
        if only is not None and name not in only:
            continue
        try:
            actual = _sha256_uri(storage.join(uri, name))
        except (storage.StorageError, OSError) as err:
            return f"{name} cannot be read ({first_line(err)})"
        if actual != expected:
            return f"{name} does not match its recorded SHA-256"
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# DCP metadata without unpickling arbitrary objects
# ---------------------------------------------------------------------------------------------
# Every global that DCP's `.metadata` pickle names, as exact (module, name) pairs: listed by
# unpickling real `dcp.save` metadata with a recording `find_class` (torch 2.13; the test
# tests/security/test_hostile_files.py repeats that listing, so a torch that adds one fails
# there, not in a user's resume). Never a module prefix: pickle resolves a dotted name by
# attribute lookup, so ("torch.distributed.checkpoint.filesystem", "os.system") would reach
# any module such a module imports.
_DCP = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
METADATA_GLOBALS = frozenset({
    (_DCP, "Metadata"), (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"),
    (_DCP, "TensorProperties"), (_DCP, "TensorStorageMetadata"),
    (_DCP, "BytesStorageMetadata"), (_DCP, "ChunkStorageMetadata"),
    (_DCP, "_MEM_FORMAT_ENCODING"),
    (_FS, "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),  # older torch
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes `.metadata` with pickle; admit only the exact classes that metadata is made
    of (and torch's dtypes, which are values, not callables)."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.filesystem  # noqa: F401 - the classes admitted

        ok = "." not in name and ((module, name) in METADATA_GLOBALS or (
            module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype)))
        if not ok:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's "
                                         f"DCP metadata")
        return super().find_class(module, name)


# torch's dtypes, which a tensor's metadata names as globals (`torch.float32`): values, not
# callables. Listed for the torch-free reading (`dcp_extents`); tests/pipeline/train/
# test_units.py checks the list against the installed torch's.
TORCH_DTYPES = frozenset({
    "bfloat16", "bit", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "cdouble",
    "cfloat", "chalf", "complex128", "complex32", "complex64", "double", "float", "float16",
    "float32", "float4_e2m1fn_x2", "float64", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "half", "int", "int1", "int16",
    "int2", "int3", "int32", "int4", "int5", "int6", "int64", "int7", "int8", "long", "qint32",
    "qint8", "quint2x4", "quint4x2", "quint8", "short", "uint1", "uint16", "uint2", "uint3",
    "uint32", "uint4", "uint5", "uint6", "uint64", "uint7", "uint8",
})


class _StandIn:
    """What an admitted torch class or function unpickles to in `dcp_extents`: the arguments
    and fields pickle gives it, nothing run."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(
                isinstance(part, dict | None) for part in state):   # (__dict__, __slots__)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:                                           # a class's own (TensorProperties')
            self.state = state


_STAND_INS = {key: type(key[1], (_StandIn,), {}) for key in METADATA_GLOBALS
              if key[0].startswith("torch")}


class _StandInUnpickler(pickle.Unpickler):
    """`_MetadataUnpickler`'s allow-list, torch's names as stand-ins."""

    def find_class(self, module: str, name: str):
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
        if module == "torch" and name in TORCH_DTYPES:
            return f"torch.{name}"
        if (module, name) in METADATA_GLOBALS:          # collections, pathlib: the real ones
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's "
                                     f"DCP metadata")


def read_dcp_metadata(uri: str):
    """The DCP `Metadata` of the checkpoint at `uri`, checked to be the shape DCP writes
    (shard files named inside `state/`). Raises pickle.UnpicklingError for anything else,
    whatever the bytes make the unpickler do."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    return _checked(_unpickle(uri, _MetadataUnpickler), Metadata, _StorageInfo)


def dcp_extents(uri: str) -> dict[str, int]:
    """{file under the checkpoint: the byte its DCP metadata says it reaches}, read without
    torch (the driver and `vit-vtab` check a run's checkpoints without importing it): the same
    allow-list as `read_dcp_metadata`, each admitted class unpickled as a plain stand-in that
    keeps its fields, so nothing of torch's (or anyone's) runs. Raises
    pickle.UnpicklingError as `read_dcp_metadata` does."""
    metadata = _checked(_unpickle(uri, _StandInUnpickler),
                        _STAND_INS[(_DCP, "Metadata")], _STAND_INS[(_FS, "_StorageInfo")])
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = f"{STATE_DIR}/{info.relative_path}"
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    return needed


def _unpickle(uri: str, unpickler):
    data = storage.read_bytes(storage.join(uri, METADATA_FILE))
    try:
        return unpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # noqa: BLE001 - hostile or damaged bytes: one kind of error
        raise pickle.UnpicklingError(f"{METADATA_FILE} is not DCP metadata "
                                     f"({type(err).__name__}: {first_line(err)})") from None


def _checked(metadata, metadata_cls, info_cls):
    infos = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, metadata_cls) or not isinstance(infos, dict) or not all(
            isinstance(i, info_cls) and isinstance(getattr(i, "relative_path", None), str)
            and i.relative_path and "/" not in i.relative_path and "\\" not in i.relative_path
            and i.relative_path not in (".", "..")
            and isinstance(getattr(i, "offset", None), int)
            and isinstance(getattr(i, "length", None), int)
            and i.offset >= 0 and i.length >= 0 for i in infos.values()):
        raise pickle.UnpicklingError(f"{METADATA_FILE} is not DCP metadata of this pipeline's "
                                     f"shape (shard files inside {STATE_DIR}/)")
    return metadata


def checkpoint_number(doc: dict) -> int:
    """Which checkpoint of its run this is (1: the first written), counted across the run's
    starts, whatever made it (`checkpoint.every` or `checkpoint.minutes`). A checkpoint
    written before the count was recorded: its step in `checkpoint.every` units, or 0 (none)
    where the step is off that grid."""
    if doc.get("number"):
        return int(doc["number"])
    config = doc.get("config") or {}
    every = (config.get("checkpoint") or {}).get("every") or \
        (config.get("train") or {}).get("checkpoint_every") or 0
    step = int(doc.get("step", 0))
    return step // every if every and step % every == 0 else 0


def vtab_due(doc: dict, vtab_every: int) -> bool:
    """Whether `eval.vtab_every=N` evaluates this checkpoint: every N-th one the run writes,
    counted (`checkpoint_number`), not its step, so that the checkpoints `checkpoint.minutes`
    makes count too (a run that saves by the clock alone gets evaluated), and a run's restarts or
    retention change nothing."""
    n = checkpoint_number(doc)
    return vtab_every > 0 and n > 0 and n % vtab_every == 0
