"""Training checkpoints: the layout, saving, loading, "latest complete", and the resume order
(as torchtitan's `CheckpointManager`); the driver and the workers ask this module. What
readers of the weights need as well (is a checkpoint complete and intact, the checksums, the
safe DCP metadata reader) is `pipeline/weights/integrity.py`, which this module imports, so
that `eval/` never imports the training code.

A run keeps its checkpoints in `<storage>/<run name>/step_<step:08d>/`:

    state/.metadata, state/__<rank>_0.distcp   torch.distributed.checkpoint (DCP): the model
                        (with the MPP head) and the AdamW state, each worker writing its own
                        shard; loads into any number of workers and any parallel strategy
    model.safetensors, vit.json    the ViT in our model format (pipeline.weights), gathered
                        from the shards: `load_vit` and `eval/vtab.py --checkpoint` take the
                        directory as it is, without training code
    train_state.json    step, samples seen, the exact data position, the resolved config,
                        the MLflow run id, and the size and SHA-256 of every file rank 0 wrote
    state/sha256_rank<r>.json   the SHA-256 of each DCP file rank r wrote (every rank writes
                        its own: no rank sees another's files)

Written last (by rank 0, after its other files) and listing the sizes it expects,
`train_state.json` plus the DCP `.metadata` (which names every shard file and the byte range
each tensor needs) make a checkpoint verifiable: `is_complete` checks that every file is there
with its size, so `latest` never returns a checkpoint that a killed upload left half-written.
Sizes prove completeness, not integrity: `verify` recomputes every file's SHA-256 (the driver
does, before a run continues from a checkpoint; readers of the weights check the weights
file), and a checkpoint that fails is marked (`corrupt.json`, nothing deleted) so that every
process of the run falls back to the previous complete one.

Saving never stalls the step for I/O: the sharded state is staged to host memory
(`dcp.async_save`, on a gloo process group of its own), then written and uploaded in the
background by Ray Train's asynchronous checkpoint upload (`CheckpointUploadMode.ASYNC`). The
loop is blocked only for the staging copy and the gather of the ViT weights
(`bench/checkpoint.py` measures it against the synchronous path).

Nothing is unpickled on load: tensors come through `torch.load(weights_only=True)`, DCP's
`.metadata` through an unpickler that admits only DCP's own metadata classes.

Resume order (`resume_point`): this run's latest complete checkpoint (a restarted worker group,
or the same command again) > `--resume CHECKPOINT` (another run's training checkpoint) >
`--init WEIGHTS` (any format `load_vit` reads; heads re-initialised) > scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.architecture import ViTConfig
from pipeline.train.lease import process_alive
from pipeline.weights.errors import CheckpointError
from pipeline.weights.integrity import (
    CORRUPT_FILE,
    METADATA_FILE,
    STATE_DIR,
    STATE_FILE,
    STATE_FORMAT,
    complete_checkpoints,
    is_complete,
    rank_sums,
    read_dcp_metadata,
    read_state,
    sha256_file,
    verify,
    vtab_due,
)

if TYPE_CHECKING:        # torch is imported where it is used: the driver never needs it
    import torch
    from torch import nn

    from pipeline.model import ViT
from pipeline.weights.integrity import (
    checkpoint_number as checkpoint_number,  # re-exported: the loop counts with it
)
from pipeline.weights.integrity import first_line as _first

log = logging.getLogger("pipeline.train")

FORMAT_VERSION = 2
# Config fields that may differ between a checkpoint and the run resuming from it.
RUNTIME_FIELDS = ("dropout", "attention_dropout", "drop_path")


@dataclass(frozen=True)
class CheckpointConfig:
    """When a run saves and how many checkpoints it keeps: the run config's `checkpoint`
    section (before it, `train.checkpoint_every`, `train.checkpoint_minutes`,
    `train.checkpoint_async` and `train.keep_checkpoints`, which still load and `--set`)."""

    every: int = 1000              # steps between checkpoints (and the last step)
    minutes: float = 0.0           # also save when this much wall time passed (0: off)
    asynchronous: bool = True      # write and upload in the background (False: the loop waits)
    keep: int = 3                  # the newest complete ones kept (`prune`)

    def __post_init__(self):
        for name in ("every", "keep"):
            if getattr(self, name) <= 0:
                raise ValueError(f"checkpoint.{name} must be positive, got "
                                 f"{getattr(self, name)}")
        if self.minutes < 0:
            raise ValueError(f"checkpoint.minutes must be >= 0 (0: off), got {self.minutes}")


def dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Where to start from
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    """Which rule of the resume order applies, and the checkpoint or weights it names."""

    kind: str                       # "own" | "resume" | "init" | "scratch"
    uri: str | None = None

    def describe(self) -> str:
        return {"own": f"this run's checkpoint {self.uri}", "resume": f"--resume {self.uri}",
                "init": f"--init {self.uri}", "scratch": "scratch"}[self.kind]


def resume_point(run_uri: str, resume: str | None, init: str | None,
                 verified: bool = False) -> ResumePoint:
    """`verified`: check the checksums of this run's checkpoint (and fall back past a damaged
    one); the driver does, once per command, and marks what fails, so that the dataset
    factory, which asks again without it at each later worker-group start (`run.TrainData`,
    which sends the answer to the workers), passes over it too."""
    own = latest_verified(run_uri) if verified else latest(run_uri)
    if own:
        return ResumePoint("own", own)
    if resume:
        return ResumePoint("resume", resume)
    if init:
        return ResumePoint("init", init)
    return ResumePoint("scratch")


def check_resume(uri: str, model_cfg: ViTConfig, checksums: bool = True) -> dict:
    """Validate `--resume` before any worker starts -> its train_state.json. Without
    `checksums` (the command's check before Ray starts), only what a listing and
    train_state.json tell: the files' SHA-256 are read once, by `pretrain` itself."""
    try:
        doc = read_state(uri)
    except (storage.StorageError, OSError, ValueError) as err:
        newest = latest(uri)
        if newest:     # a run folder: which of its checkpoints is for the user to say
            raise CheckpointError(f"--resume {uri} is a run folder, not one of its "
                                  f"checkpoints; give one, e.g. --resume {newest}") from None
        raise CheckpointError(f"--resume {uri}: not a training checkpoint ({_first(err)}); "
                              f"to start from its weights use --init") from None
    if not is_complete(uri):
        raise CheckpointError(f"--resume {uri}: the checkpoint is incomplete (files missing or "
                              f"truncated); pick an earlier step")
    problem = verify(uri) if checksums else None
    if problem:
        raise CheckpointError(f"--resume {uri}: the checkpoint is damaged ({problem}); pick "
                              f"an earlier step")
    check_architecture(doc["config"]["model"], model_cfg, f"--resume {uri}")
    return doc


def check_init(uri: str, model_cfg: ViTConfig, load: bool = True) -> None:
    """Validate `--init` before any worker starts: the weights load into this architecture.
    Without `load` (the command's check before Ray starts), what the files tell without the
    weights (`pipeline.weights.registry.peek`: there, a format reads them, the architecture
    they state or their safetensors header shows)."""
    if not load:
        from pipeline.weights.registry import peek

        peek(uri, **_structure(model_cfg))
        return
    from pipeline.model import ViT

    init_model(ViT(model_cfg), uri)


def _structure(cfg: ViTConfig) -> dict:
    """The structural fields `--init` weights must have: this run's (the resolution may
    differ: the position embedding is resampled)."""
    hybrid = {"resnet_width": cfg.resnet_width} if cfg.is_hybrid else {}
    return dict(patch_size=cfg.patch_size, hidden_size=cfg.hidden_size, depth=cfg.depth,
                mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads, resnet_layers=cfg.resnet_layers,
                **hybrid)


def check_architecture(ckpt_cfg: dict, run_cfg: ViTConfig, where: str) -> None:
    """A resumed run must have the checkpoint's architecture (runtime fields may differ).
    The checkpoint's config goes through ViTConfig, so fields it predates take their
    defaults and JSON lists compare equal to tuples."""
    try:
        ckpt_cfg = ViTConfig.from_dict(ckpt_cfg).to_dict()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: the checkpoint's model config is not readable by "
                              f"this code ({err})") from None
    theirs = {k: v for k, v in ckpt_cfg.items() if k not in RUNTIME_FIELDS}
    ours = {k: v for k, v in run_cfg.to_dict().items() if k not in RUNTIME_FIELDS}
    diff = sorted(k for k in ours if theirs.get(k) != ours[k])
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {ours[k]!r}" for k in diff)
        raise CheckpointError(f"{where}: the checkpoint's model does not match this run's "
                              f"({pairs}); use --init to start from its weights instead")


def init_model(model: ViT, uri: str) -> None:
    """--init: weights of any format `load_vit` reads; the body is loaded, the heads are
    this run's fresh ones (the checkpoint's may have another number of classes), and the
    position embedding is resampled to this run's resolution."""
    from pipeline.weights import load_vit

    cfg = model.cfg
    src = load_vit(uri, image_size=cfg.image_size, **_structure(cfg))
    if (src.cfg.input_mean, src.cfg.input_std) != (cfg.input_mean, cfg.input_std):
        fmt = lambda v: ",".join(f"{x:g}" for x in v)      # noqa: E731
        raise CheckpointError(
            f"{uri} expects inputs normalised with mean {fmt(src.cfg.input_mean)}, std "
            f"{fmt(src.cfg.input_std)}, but this run uses mean {fmt(cfg.input_mean)}, std "
            f"{fmt(cfg.input_std)}; add --set model.input_mean={fmt(src.cfg.input_mean)} "
            f"--set model.input_std={fmt(src.cfg.input_std)}")
    body = {k: v for k, v in src.state_dict().items()
            if not k.startswith(("head.", "pre_logits."))}
    own = model.state_dict()
    missing = [k for k in own if not k.startswith(("head.", "pre_logits.")) and k not in body]
    if missing:
        raise CheckpointError(f"{uri}: cannot initialise from it, missing {missing[:5]}")
    own.update(body)
    model.load_state_dict(own, strict=True)


# ---------------------------------------------------------------------------------------------
# Completeness and "latest"
# ---------------------------------------------------------------------------------------------
def latest(run_uri: str) -> str | None:
    """The newest complete checkpoint of a run, or None. Incomplete ones (an upload cut off
    by a kill) are skipped with a warning."""
    return next(complete_checkpoints(run_uri), None)


def prune(run_uri: str, keep: int, keep_every: int = 0) -> list[str]:
    """Retention: keep the `keep` newest complete checkpoints and whatever is newer than the
    oldest of them (uploads in flight), and every `keep_every`-th checkpoint (those VTAB
    evaluates: eval.vtab_every, `vtab_due`); delete every other older step folder, complete
    or not (stale ones of earlier starts, half-written ones, damaged ones).
    Ray Train's own `num_to_keep` only deletes the checkpoints its current controller
    registered, so older ones accumulated across starts. -> the folders deleted.

    It runs in rank 0's upload thread, before that rank's upload of the next checkpoint
    (`CheckpointWriter.save(before_upload=)`): Ray Train's one upload thread per worker has
    finished rank 0's earlier uploads by then, but other ranks' may be in flight, so the
    newest folders can be incomplete. They are newer than every checkpoint kept, so never
    deleted, and not warned about (the listing is quiet)."""
    kept = []
    for uri in complete_checkpoints(run_uri, warn=False):
        kept.append(uri)
        if len(kept) == keep:
            break
    if len(kept) < keep or keep <= 0:
        return []
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(run_uri)
    oldest = kept[-1].rstrip("/").rsplit("/", 1)[-1]
    stale = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if i.type == pafs.FileType.Directory and i.base_name.startswith("step_")
             and i.base_name < oldest and not _kept_every(run_uri, i.base_name, keep_every)]
    for path in stale:
        try:
            fs.delete_dir(path)
        except OSError as err:
            log.warning("retention could not delete %s: %s", path, _first(err))
    return stale


def _kept_every(run_uri: str, name: str, every: int) -> bool:
    if every <= 0:
        return False
    try:
        return vtab_due(read_state(storage.join(run_uri, name)), every)
    except Exception:  # noqa: BLE001 - no readable state (half-written, damaged): not kept
        return False


def mark_corrupt(uri: str, reason: str) -> None:
    """Mark a checkpoint that failed `verify` so that no process of the run picks it again
    (nothing is deleted: the files stay for inspection)."""
    try:
        storage.write_bytes(storage.join(uri, CORRUPT_FILE),
                            json.dumps({"reason": reason}).encode())
    except (storage.StorageError, OSError) as err:
        log.warning("could not mark %s as corrupt: %s", uri, _first(err))


def latest_verified(run_uri: str) -> str | None:
    """The newest complete checkpoint whose files match their checksums. One that does not is
    marked corrupt, with a warning, and the previous one is tried: a run continues from the
    last good checkpoint instead of failing on a damaged one."""
    for uri in complete_checkpoints(run_uri):
        problem = verify(uri)
        if problem is None:
            return uri
        log.warning("checkpoint %s is damaged (%s): falling back to the previous one", uri,
                    problem)
        mark_corrupt(uri, problem)
    return None


def _reader(uri: str):
    """A DCP reader over local or S3 storage (ranged reads of just the bytes each rank needs),
    with the safe metadata unpickler."""
    from fsspec.implementations.arrow import ArrowFSWrapper
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem

    class Reader(FileSystemReader):
        def __init__(self):
            super().__init__("/nonexistent")        # replaced below: fs and path are ours
            pa_fs, root = storage.filesystem(storage.join(uri, STATE_DIR))
            self.fs = FileSystem()
            self.fs.fs = ArrowFSWrapper(pa_fs)
            self.path = root

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_dcp_metadata(uri)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader()


def _load_planner():
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        """Non-tensor values (optimizer hyperparameters) with `weights_only=True`."""

        def load_bytes(self, read_item, value):
            # As DefaultLoadPlanner.load_bytes, with weights_only: the value goes into the
            # caller's (nested) state dict, not only into the planner's flattened copy.
            value.seek(0)
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                            loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Planner()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


# ---------------------------------------------------------------------------------------------
# Loading into a (wrapped) model
# ---------------------------------------------------------------------------------------------
def load(uri: str, model: nn.Module, optimizer: torch.optim.Optimizer, model_cfg: ViTConfig,
         where: str) -> dict:
    """Load the sharded model and optimizer state of a training checkpoint into the wrapped
    `model` and its `optimizer` (a collective: every worker calls it). -> train_state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    try:
        doc = read_state(uri)
    except (storage.StorageError, OSError, ValueError) as err:
        raise CheckpointError(f"{where}: not a training checkpoint ({_first(err)})") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: written by another version of this pipeline (format "
                              f"{doc.get('format_version')}); start from its weights with --init")
    check_architecture(doc["config"]["model"], model_cfg, where)
    state = _dcp_state(model, optimizer)
    dcp.load(state, storage_reader=_reader(uri), planner=_load_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return doc


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
STAGING_PREFIX = "vit-ckpt-"        # + "<pid>-<step>-": local staging folders in TMPDIR
# Below this much free space a failed write is a full disk: torch.save's zip writer reports
# ENOSPC as "unexpected pos N vs M", with no errno.
FULL_BYTES = 64 << 20
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122",
              "errno 28", "errno 122")


def sweep_staging(directory: str | None = None) -> list[Path]:
    """Remove the staging folders of processes of this host that are gone (a worker killed
    mid-upload leaves one behind; each is a checkpoint's size). -> the folders removed."""
    import re

    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        m = re.match(rf"{STAGING_PREFIX}(\d+)-\d+-", path.name)
        if m and path.is_dir() and not process_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _causes(err: BaseException):
    """`err`, its causes and contexts, and the per-rank errors a DCP CheckpointException
    wraps."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def _disk_full(err: BaseException, path: str | os.PathLike | None) -> bool:
    """Whether `err`, raised writing under `path`, means the disk (or quota) is full."""
    import errno

    for e in _causes(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
    if path is not None:
        try:
            return shutil.disk_usage(path).free < FULL_BYTES
        except OSError:
            return False
    return False


def _save_error(err: BaseException, step: int, where: str, path: str) -> BaseException:
    """What a failed checkpoint write raises. A full disk is `Fatal` (one line; a retry would
    fill it again). DCP's CheckpointException derives from BaseException, which Ray Train's
    upload thread does not catch (the failure would vanish and later reports wait forever):
    other failures go on as a RuntimeError, retried as transient."""
    from pipeline.train.failures import Fatal

    if isinstance(err, (Fatal, KeyboardInterrupt, SystemExit)):
        return err
    if _disk_full(err, path):
        fix = "TMPDIR" if where == "staging" else "--out"
        place = "the local staging folder" if where == "staging" else "the checkpoint storage"
        return Fatal(f"checkpoint at step {step}: no space left on {place} ({path}); free "
                     f"space there or point {fix} elsewhere")
    if not isinstance(err, Exception):
        return RuntimeError(f"checkpoint at step {step}: writing {where} failed: "
                            f"{_first(err)}")
    return err


def _reraise(err: BaseException, step: int, where: str, path: str):
    mapped = _save_error(err, step, where, path)
    if mapped is err:
        raise err
    raise mapped from err


class CheckpointWriter:
    """Saves training checkpoints from every worker through `ray.train.report`.

    `save` blocks for the gather of the ViT weights (to rank 0's host memory) and the staging
    of this worker's shards; with `asynchronous` the writing and the upload run in Ray Train's
    upload thread while training goes on, and the checkpoint is registered when every
    worker's upload is done. Ray Train keeps the last `checkpoint.keep` registered ones."""

    def __init__(self, rank: int, asynchronous: bool):
        import torch.distributed as dist

        self.rank, self.asynchronous = rank, asynchronous
        self.pending = None          # the previous asynchronous DCP write
        self.pending_step = 0
        self.staging: set[Path] = set()     # local folders not yet uploaded and removed
        self.failed: list[BaseException] = []    # an upload that failed in Ray's thread
        for path in sweep_staging():
            log.info("removed %s, left by a process that is gone", path)
        # DCP's own collectives (plans, metadata) run in a background thread: give them a
        # process group of their own so they never interleave with the training's.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, vit_cfg: ViTConfig,
             doc: dict, metrics: dict, before_upload=None) -> None:
        """`before_upload`: run where the upload runs (Ray's upload thread when asynchronous),
        before it: rank 0's retention (`prune`), whose listing of the run folder grows with
        the ranks (2 files each a checkpoint: ~0.7 s on S3 at 1,024, bench/scale.py) and so
        stays out of the training loop."""
        import ray.train
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        step = doc["step"]
        if self.failed:              # stop here rather than stage a checkpoint Ray will drop
            raise self.failed[0]
        # The ViT in our format, on rank 0: a collective gather of the unsharded weights.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        vit_state = {k[len("vit."):]: v for k, v in full.items() if k.startswith("vit.")}
        tmp = tempfile.gettempdir()
        try:
            local = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{step}-"))
        except OSError as err:
            _reraise(err, step, "staging", tmp)
        self.staging.add(local)
        self.close()                     # one write at a time on the checkpoint group
        try:
            writer = dcp.FileSystemWriter(str(local / STATE_DIR))
            state = _dcp_state(model, optimizer)
            if self.asynchronous:
                self.pending = dcp.async_save(state, storage_writer=writer,
                                              process_group=self.group)
                self.pending_step = step
                pending = self.pending
            else:
                dcp.save(state, storage_writer=writer, process_group=self.group)
                pending = None
        except BaseException as err:
            self._discard_staging()
            _reraise(err, step, "staging", tmp)
        rank, staging, failed = self.rank, self.staging, self.failed

        def write_and_upload(checkpoint, checkpoint_dir_name):
            # Ray removes `local` after a successful upload; every failure removes it here.
            try:
                where, path = "staging", tmp
                if pending is not None:
                    pending.result()
                write_rank_checksums(local, rank)
                if rank == 0:
                    _write_model_and_state(local, vit_state, vit_cfg, doc)
                if before_upload is not None:
                    try:
                        before_upload()
                    except Exception as err:  # noqa: BLE001 - never fails the checkpoint
                        log.warning("before the upload of step %d: %s", step, _first(err))
                where, path = "upload", _storage_path()
                persisted = ray.train.get_context().get_storage().persist_current_checkpoint(
                    checkpoint, checkpoint_dir_name)
            except BaseException as err:
                shutil.rmtree(local, ignore_errors=True)
                staging.discard(local)
                failed.append(_save_error(err, step, where, path))
                _reraise(err, step, where, path)
            staging.discard(local)
            return persisted

        mode = ray.train.CheckpointUploadMode
        try:
            ray.train.report({**metrics, "step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=dir_name(step),
                             checkpoint_upload_mode=mode.ASYNC if self.asynchronous else
                             mode.SYNC, checkpoint_upload_fn=write_and_upload,
                             delete_local_checkpoint_after_upload=True)
        except BaseException as err:
            self._discard_staging()
            _reraise(err, step, "staging", tmp)

    def _discard_staging(self) -> None:
        """On a failure: the run stops (or its worker group restarts), so no staging folder
        of this writer will be uploaded any more."""
        for path in list(self.staging):
            shutil.rmtree(path, ignore_errors=True)
            self.staging.discard(path)

    def close(self) -> None:
        """Wait for the last asynchronous write (Ray waits for the uploads)."""
        if self.pending is not None:
            try:
                self.pending.result()
            except BaseException as err:
                self._discard_staging()
                _reraise(err, self.pending_step, "staging", tempfile.gettempdir())
            finally:
                self.pending = None


def _storage_path() -> str:
    """Where Ray Train uploads checkpoints, for messages."""
    import ray.train

    storage_ctx = ray.train.get_context().get_storage()
    fs = storage_ctx.storage_filesystem
    path = storage_ctx.experiment_fs_path
    return f"s3://{path}" if getattr(fs, "type_name", "") == "s3" else path


def write_local(directory: str | os.PathLike, model: nn.Module,
                optimizer: torch.optim.Optimizer, vit_cfg: ViTConfig, doc: dict) -> None:
    """Write a whole training checkpoint into a local directory from one process (no Ray,
    no process group): for tools and tests. Training writes through `CheckpointWriter`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    directory = Path(directory)
    dcp.save(_dcp_state(model, optimizer), storage_writer=dcp.FileSystemWriter(
        str(directory / STATE_DIR)), no_dist=True)
    write_rank_checksums(directory, 0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    _write_model_and_state(directory, {k[len("vit."):]: v for k, v in full.items()
                                       if k.startswith("vit.")}, vit_cfg, doc)


def _write_model_and_state(directory: Path, vit_state: dict, vit_cfg: ViTConfig,
                           doc: dict) -> None:
    """Rank 0's files: the ViT in our model format, then train_state.json, which lists their
    sizes and so goes last. A `data_position` that is a callable (`loop.PositionChain`) is
    resolved here, off the training loop."""
    from pipeline.weights import CONFIG_FILE, WEIGHTS_FILE, write_weights

    if callable(doc.get("data_position")):
        doc = {**doc, "data_position": doc["data_position"]()}
    write_weights(vit_state, vit_cfg, directory, {
        "step": doc["step"], "run_name": doc.get("run_name", ""),
        "mlflow_run_id": doc.get("run_id") or ""})
    names = (WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE)
    files = {n: (directory / n).stat().st_size for n in names}
    sums = {n: sha256_file(directory / n) for n in names}
    (directory / STATE_FILE).write_text(json.dumps({**doc, "files": files, "sha256": sums}))


def write_rank_checksums(directory: Path, rank: int) -> None:
    """The SHA-256 of the DCP files this rank wrote into its local staging `directory`."""
    state = directory / STATE_DIR
    sums = {p.name: sha256_file(p) for p in sorted(state.iterdir())
            if p.is_file() and p.name != ".metadata" and not p.name.startswith("sha256_")}
    (directory / rank_sums(rank)).write_text(json.dumps(sums, sort_keys=True))


def new_state(step: int, samples_seen: int, data_position, config: dict,
              run_name: str, run_id: str | None, world_size: int, strategy: str,
              number: int = 0) -> dict:
    """The contents of train_state.json (`files` is added when the files are written).
    `number`: which checkpoint of the run this is (`checkpoint_number`; 0: not counted).
    `data_position`: a dict, None, or a callable returning the dict when the file is written
    (`loop.PositionChain`)."""
    return {"format": STATE_FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "number": number,
            "samples_seen": samples_seen, "data_position": data_position, "config": config,
            "run_name": run_name, "run_id": run_id, "world_size": world_size,
            "strategy": strategy}


# ---------------------------------------------------------------------------------------------
# The data position a start continues from
# ---------------------------------------------------------------------------------------------
def same_data(doc: dict, cfg) -> bool:
    """Whether a checkpoint's data position is a position in `cfg`'s training stream (the
    same data, split, seed and synthetic size)."""
    theirs = doc.get("config", {}).get("data", {})
    ours = cfg.data
    keys = ("source", "uri", "split", "synthetic_samples")
    return all(theirs.get(k) == getattr(ours, k) for k in keys) and \
        doc.get("config", {}).get("train", {}).get("seed") == cfg.train.seed


def start_position(point: ResumePoint, cfg):
    """The DataPosition a run starting at `point` reads from (empty: from the top)."""
    from pipeline.data.plan import DataPosition

    if point.kind in ("own", "resume"):
        doc = read_state(point.uri)
        if same_data(doc, cfg) and doc.get("data_position") is not None:
            return DataPosition.from_dict(doc["data_position"])
    return DataPosition()
