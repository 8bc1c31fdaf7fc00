"""Nothing in a run folder or a storage prefix can execute code.

The corpus (tests/security/corpus.py) plants, in the files the commands read, pickles that
would run `touch MARKER`: dotted-name tricks and payloads inside DCP's `.metadata`, pickles in
place of train_state.json, model.safetensors and vit.json, `.pth` / `.bin` files with
`__reduce__` payloads, object-array `.npz`, `.pkl` members in a shard, and Ray Tune's
`tuner.pkl` / experiment state in a VTAB evaluation's storage. Each command that reads them
runs as a real subprocess (the installed console scripts); the marker must never appear, and
the command either ends with one `error: ...` line or falls back past the hostile checkpoint
with a warning.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import sqlite_store
from tests.security import corpus

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile file ran code"


def run(command: str, *args, env: dict | None = None, timeout: float = 120):
    return subprocess.run([str(BIN / command), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})


def one_error_line(out) -> str:
    assert out.returncode != 0, out.stdout + out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "weights_only=False" not in out.stderr and "weights_only` set to `False" \
        not in out.stderr
    return errors[0]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return corpus.write_good_checkpoint(tmp_path_factory.mktemp("good") / "run" / "step_00000002",
                                        step=2)


def hostile_run(tmp_path: Path, good: Path, kind: str, marker: Path, keep_good: bool) -> Path:
    """A run folder whose newest checkpoint (step 4) has one hostile file; with `keep_good`
    an intact step 2 precedes it."""
    import shutil

    run_dir = tmp_path / "runs" / "hostile"
    if keep_good:
        shutil.copytree(good, run_dir / "step_00000002")
    corpus.plant(Path(shutil.copytree(good, run_dir / "step_00000004")), kind, marker)
    return run_dir


# ---------------------------------------------------------------------------------------------
# The corpus is live, and the readers refuse it (in process, milliseconds)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [corpus.reduce_pickle, corpus.dotted_pickle])
def test_the_payloads_run_when_unpickled(tmp_path, make):
    """Without this, a test below could pass because its payload was inert."""
    target = tmp_path / "ran"
    pickle.loads(make(target))
    assert target.exists()


def test_dcp_metadata_names_only_allow_listed_globals(good_checkpoint):
    """The allow-list is exactly what DCP's metadata pickle names (listed from real metadata
    with a recording unpickler): a torch that adds a class fails here, not in a resume."""
    from pipeline.weights import integrity

    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO((good_checkpoint / "state" / ".metadata").read_bytes())).load()
    dtypes = {("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
    assert seen <= integrity.METADATA_GLOBALS | dtypes, seen - integrity.METADATA_GLOBALS
    # The torch-free reading (the driver's completeness checks) admits the same dtypes, and
    # finds the same extents as DCP's own classes give.
    assert {n for _, n in dtypes} == integrity.TORCH_DTYPES
    metadata = integrity.read_dcp_metadata(str(good_checkpoint))
    ends: dict = {}
    for info in metadata.storage_data.values():
        name = f"state/{info.relative_path}"
        ends[name] = max(ends.get(name, 0), info.offset + info.length)
    assert ends and integrity.dcp_extents(str(good_checkpoint)) == ends
    assert integrity.is_complete(str(good_checkpoint))


@pytest.mark.parametrize("kind", ["metadata-dotted-name", "metadata-reduce",
                                  "metadata-wrapped"])
def test_hostile_dcp_metadata_is_refused(tmp_path, good_checkpoint, marker, kind):
    import shutil

    from pipeline.train import checkpoints

    ckpt = corpus.plant(Path(shutil.copytree(good_checkpoint, tmp_path / "run" / "step_1")),
                        kind, marker)
    from pipeline.weights import integrity

    for read in (checkpoints.read_dcp_metadata, integrity.dcp_extents):
        with pytest.raises(pickle.UnpicklingError, match="refusing to load|not DCP metadata"):
            read(str(ckpt))
    assert not checkpoints.is_complete(str(ckpt))
    assert checkpoints.latest(str(tmp_path / "run")) is None


@pytest.mark.parametrize("name, make", [
    ("evil.pth", corpus.evil_torch_file), ("pytorch_model.bin", corpus.evil_torch_file),
    ("vit.npz", corpus.object_npz), ("model.safetensors", None), ("random.bin", None)])
def test_weight_files_with_payloads_are_refused(tmp_path, marker, name, make):
    from pipeline.weights import CheckpointError, load_vit

    path = tmp_path / name
    if make is not None:
        make(path, marker)
    elif name == "random.bin":
        path.write_bytes(os.urandom(1000))
    else:
        path.write_bytes(corpus.reduce_pickle(marker))
    with pytest.raises(CheckpointError) as info:
        load_vit(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    assert "weights_only" not in message, message     # torch's advice would run the payload


def test_shard_members_are_never_unpickled(tmp_path, marker):
    """Our tar reader takes images and labels by suffix; `.pkl` / `.pyd` members (which
    webdataset's default decoders unpickle) are ignored."""
    from pipeline.data.reader import BadDataPolicy, iter_samples

    shard = corpus.shard_with_pickles(tmp_path / "shard-000000.tar", marker)
    with open(shard, "rb") as stream:
        samples = list(iter_samples(stream, shard.name, BadDataPolicy(), num_classes=10))
    assert [s.label for s in samples] == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# The commands, as users run them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(corpus.CHECKPOINT_PLANTS))
def test_export_falls_back_past_a_hostile_newest_checkpoint(tmp_path, good_checkpoint, marker,
                                                            kind):
    """`vit-export RUN` takes the run's newest checkpoint that is complete and intact: the
    hostile step 4 is skipped with a warning, step 2 is exported."""
    run_dir = hostile_run(tmp_path, good_checkpoint, kind, marker, keep_good=True)
    out = run("vit-export", "--checkpoint", run_dir, "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step_00000002 ->" in out.stdout
    assert "step_00000004" in out.stderr          # the warning names what was skipped
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["vit-export", "vit-analyze", "vit-vtab"])
def test_a_run_with_only_a_hostile_checkpoint_is_refused(tmp_path, good_checkpoint, marker,
                                                         command):
    """The issue's exploit: naming the run folder was enough. Now: one error line, before
    Ray starts, nothing written."""
    run_dir = hostile_run(tmp_path, good_checkpoint, "metadata-dotted-name", marker,
                          keep_good=False)
    args = {"vit-export": ["--checkpoint", run_dir, "--out", tmp_path / "out"],
            "vit-analyze": ["--checkpoint", run_dir, "--data", tmp_path, "--out",
                            tmp_path / "out", "--no-mlflow"],
            "vit-vtab": ["--checkpoint", run_dir, "--data", tmp_path, "--tasks", "kitti",
                         "--out", tmp_path / "ev"]}[command]
    line = one_error_line(run(command, *args, env={
        "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}))
    assert "not a ViT checkpoint" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("kind", ["safetensors-pickle", "vit_json-pickle"])
def test_vtab_refuses_a_hostile_checkpoint_folder(tmp_path, good_checkpoint, marker, kind):
    import shutil

    ckpt = corpus.plant(Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt")), kind,
                        marker)
    one_error_line(run("vit-vtab", "--checkpoint", ckpt, "--data", tmp_path, "--tasks",
                       "kitti", "--out", tmp_path / "ev",
                       env={"MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}))
    assert not (tmp_path / "ev").exists()


def test_vtab_refuses_a_trial_record_that_is_not_its_json(tmp_path, good_checkpoint, marker):
    """The record of finished trials is JSON the driver wrote; a pickle in its place stops
    the evaluation before Ray starts."""
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    write_grating_task(tmp_path / "vtab", BY_NAME["kitti"], train=4, val=2, test=4)
    (tmp_path / "ev" / "planted").mkdir(parents=True)
    (tmp_path / "ev" / "planted" / "select_trials.json").write_bytes(
        corpus.reduce_pickle(marker))
    line = one_error_line(run(
        "vit-vtab", "--checkpoint", good_checkpoint, "--data", tmp_path / "vtab", "--tasks",
        "kitti", "--resolution", "32", "--out", tmp_path / "ev", "--name", "planted",
        env={"MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}))
    assert "select_trials.json is not a record of finished trials" in line, line


# ---------------------------------------------------------------------------------------------
# Pretraining (Ray starts before the checks: the session's cluster, shared)
# ---------------------------------------------------------------------------------------------
def pretrain(ray_local, tmp_path, *args):
    return run("vit-pretrain", "--preset", "smoke", "--set", "train.total_steps=20",
               "--set", "probe.every=0", "--out", tmp_path / "runs", *args,
               env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                    "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}, timeout=300)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("flag, kind", [("--resume", "metadata-dotted-name"),
                                        ("--resume", "train_state-pickle"),
                                        ("--init", "evil.pth"), ("--init", "vit.npz")])
def test_pretrain_refuses_hostile_resume_and_init(ray_local, tmp_path, good_checkpoint, marker,
                                                  flag, kind):
    import shutil

    if flag == "--resume":
        target = corpus.plant(Path(shutil.copytree(good_checkpoint, tmp_path / "other" /
                                                   "step_00000002")), kind, marker)
    elif kind == "evil.pth":
        target = corpus.evil_torch_file(tmp_path / kind, marker)
    else:
        target = corpus.object_npz(tmp_path / kind, marker)
    line = one_error_line(pretrain(ray_local, tmp_path, "--name", "fresh", flag, target))
    assert str(target) in line, line
    assert not list((tmp_path / "runs").rglob("step_*"))        # nothing trained


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_continues_from_the_checkpoint_before_a_hostile_one(ray_local, tmp_path,
                                                                     good_checkpoint, marker):
    """The run's own newest checkpoint is hostile: skipped with a warning, and the run
    continues from the one before it (the same command, as after a crash)."""
    run_dir = hostile_run(tmp_path, good_checkpoint, "metadata-dotted-name", marker,
                          keep_good=True)
    out = pretrain(ray_local, tmp_path, "--name", run_dir.name)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "step_00000004" in out.stderr and "step_00000002" in out.stderr
    assert "finished at step 20" in out.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_vtab_never_restores_tune_from_planted_state(ray_local, tmp_path, good_checkpoint,
                                                     marker):
    """tuner.pkl and experiment state planted where Tune keeps them (what `Tuner.restore`
    unpickled): the evaluation runs its trials as a new experiment and reads none of it."""
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    write_grating_task(tmp_path / "vtab", BY_NAME["kitti"], train=8, val=4, test=8)
    for phase in ("select", "final"):
        corpus.plant_tune_state(tmp_path / "ev" / "planted" / phase, marker)
    out = run("vit-vtab", "--checkpoint", good_checkpoint, "--data", tmp_path / "vtab",
              "--tasks", "kitti", "--resolution", "32", "--lrs", "0.01", "--steps", "3",
              "--batch-size", "4", "--out", tmp_path / "ev", "--name", "planted",
              env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                   "MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")}, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "Mean of tasks" in out.stdout
    assert (tmp_path / "ev" / "planted" / "final_trials.json").exists()
