"""Checkpoint integrity: every file's SHA-256 is recorded and checked; a damaged newest
checkpoint (same size, other bytes) is marked and passed over for the previous one. No Ray."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.train import checkpoints
from pipeline.weights import CheckpointError, integrity, resolve_checkpoint
from tests.pipeline.train.test_units import _write, tiny_run


def flip_byte(path, offset=None):
    """Same size, one byte changed: what a bad disk or a torn copy leaves."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def run(tmp_path):
    cfg, model, opt = tiny_run()
    run = tmp_path / "run"
    for step in (10, 20, 30):
        _write(run / checkpoints.dir_name(step), cfg, model, opt, step)
    return run


def test_every_file_has_a_recorded_checksum(run):
    newest = run / "step_00000030"
    sums = integrity.checksums(str(newest))
    on_disk = {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()}
    # Everything but the checksum records themselves is covered, DCP shards included.
    covered = on_disk - {"train_state.json", "state/sha256_rank0.json"}
    assert set(sums) == covered
    assert any(name.endswith(".distcp") for name in sums)
    import hashlib

    for name, digest in sums.items():
        assert hashlib.sha256((newest / name).read_bytes()).hexdigest() == digest
    assert checkpoints.verify(str(newest)) is None


@pytest.mark.parametrize("name", ["state/__0_0.distcp", "model.safetensors", "vit.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(run, name, caplog):
    newest = run / "step_00000030"
    flip_byte(newest / name, offset=-5 if name == "vit.json" else None)
    # Sizes still match: completeness alone cannot tell.
    assert checkpoints.latest(str(run)) == str(newest)
    assert name in checkpoints.verify(str(newest))
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        assert checkpoints.latest_verified(str(run)) == str(run / "step_00000020")
    assert "step_00000030 is damaged" in caplog.text and "falling back" in caplog.text
    # Marked, not deleted: every other process of the run now skips it too.
    marker = json.loads((newest / checkpoints.CORRUPT_FILE).read_text())
    assert name in marker["reason"]
    assert (newest / name).exists()
    assert checkpoints.latest(str(run)) == str(run / "step_00000020")
    point = checkpoints.resume_point(str(run), None, None)
    assert point.kind == "own" and point.uri == str(run / "step_00000020")


def test_unreadable_dcp_metadata_is_passed_over(run):
    flip_byte(run / "step_00000030" / "state" / ".metadata")
    assert checkpoints.latest_verified(str(run)) == str(run / "step_00000020")


def test_all_damaged_means_no_checkpoint(run):
    for step in (10, 20, 30):
        flip_byte(run / checkpoints.dir_name(step) / "model.safetensors")
    assert checkpoints.latest_verified(str(run)) is None
    assert checkpoints.resume_point(str(run), None, None, verified=True).kind == "scratch"


def test_a_missing_rank_record_makes_the_checkpoint_incomplete(run):
    (run / "step_00000030" / "state" / "sha256_rank0.json").unlink()
    assert not checkpoints.is_complete(str(run / "step_00000030"))
    assert checkpoints.latest(str(run)) == str(run / "step_00000020")


def test_readers_of_a_run_folder_skip_damaged_weights(run):
    flip_byte(run / "step_00000030" / "model.safetensors")
    assert resolve_checkpoint(str(run)) == str(run / "step_00000020")


def test_resume_refuses_a_damaged_checkpoint(run):
    cfg, _, _ = tiny_run()
    flip_byte(run / "step_00000020" / "state" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"damaged \(state/__0_0.distcp does not match"):
        checkpoints.check_resume(str(run / "step_00000020"), cfg.model)


def test_checkpoints_without_checksums_still_load(run):
    """Checkpoints written before checksums were recorded: sizes only, as before."""
    newest = run / "step_00000030"
    doc = json.loads((newest / "train_state.json").read_text())
    del doc["sha256"]
    (newest / "train_state.json").write_text(json.dumps(doc))
    (newest / "state" / "sha256_rank0.json").unlink()
    assert checkpoints.latest_verified(str(run)) == str(newest)


def test_retention_keeps_exactly_the_newest_complete_ones(tmp_path):
    cfg, model, opt = tiny_run()
    run = tmp_path / "run"
    for step in (10, 20, 30, 40, 50, 60):
        _write(run / checkpoints.dir_name(step), cfg, model, opt, step)
    # A stale half-written one of an earlier start, a damaged one, an upload in flight.
    (run / "step_00000005" / "state").mkdir(parents=True)
    flip_byte(run / "step_00000050" / "model.safetensors")
    checkpoints.mark_corrupt(str(run / "step_00000050"), "test")
    (run / "step_00000070" / "state").mkdir(parents=True)
    deleted = checkpoints.prune(str(run), keep=2)
    left = sorted(p.name for p in run.iterdir())
    # Complete: 60 and 40 kept; 50 (damaged) sits between them; 70 is in flight.
    assert left == ["step_00000040", "step_00000050", "step_00000060", "step_00000070"]
    assert sorted(p.rsplit("/", 1)[-1] for p in deleted) == [
        "step_00000005", "step_00000010", "step_00000020", "step_00000030"]
    assert checkpoints.prune(str(run), keep=2) == []
    # Fewer complete ones than `keep`: nothing is deleted.
    assert checkpoints.prune(str(run), keep=5) == []


def test_retention_keeps_the_checkpoints_vtab_evaluates(tmp_path):
    """eval.vtab_every=2: every second checkpoint the run wrote, counted whatever made it
    (here steps 17 and 26 by checkpoint.minutes), waits for its evaluation (after training,
    on one machine), whatever checkpoint.keep says."""
    cfg, model, opt = tiny_run()
    run = tmp_path / "run"
    for number, step in enumerate((10, 17, 20, 26, 30, 40), start=1):
        _write(run / checkpoints.dir_name(step), cfg, model, opt, step, number=number)
    (run / "step_00000035" / "state").mkdir(parents=True)        # half-written: no state
    deleted = checkpoints.prune(str(run), keep=1, keep_every=2)
    assert sorted(p.name for p in run.iterdir()) == [
        "step_00000017", "step_00000026", "step_00000040"]
    assert sorted(p.rsplit("/", 1)[-1] for p in deleted) == [
        "step_00000010", "step_00000020", "step_00000030", "step_00000035"]
    assert checkpoints.prune(str(run), keep=1, keep_every=0) != []   # off: plain retention


def test_checkpoints_written_before_the_count_are_counted_by_step():
    """train_state.json without `number` (an earlier release): the step in checkpoint.every
    units, as the rule was; a step off that grid (a checkpoint.minutes one) is never due."""
    state = {"step": 100, "config": {"checkpoint": {"every": 50}}}
    assert checkpoints.checkpoint_number(state) == 2 and checkpoints.vtab_due(state, 2)
    assert not checkpoints.vtab_due({**state, "step": 120}, 2)
    legacy = {"step": 40, "config": {"train": {"checkpoint_every": 20}}}
    assert checkpoints.checkpoint_number(legacy) == 2
    assert checkpoints.vtab_due({**state, "number": 3}, 3)
    assert not checkpoints.vtab_due(state, 0)


def test_resume_restores_the_optimizers_non_tensor_state(tmp_path):
    """param_groups (lr, betas, weight decay, ...) are non-tensor values: they must reach the
    optimizer, not only the planner's flattened copy of the state dict."""
    import torch

    from pipeline.model import ViT
    from pipeline.train.step import Pretrainer, decay_names, make_optimizer
    from tests.pipeline.train.test_units import CPU

    cfg, model, opt = tiny_run()
    for group in opt.param_groups:
        group["lr"], group["betas"] = 0.0123, (0.5, 0.75)
    _write(tmp_path, cfg, model, opt, 1)
    fresh = Pretrainer(ViT(cfg.model), "softmax")
    fresh_opt = make_optimizer(fresh, decay_names(fresh), cfg, CPU)
    assert fresh_opt.param_groups[0]["lr"] != 0.0123
    checkpoints.load(str(tmp_path), fresh, fresh_opt, cfg.model, "test")
    for group in fresh_opt.param_groups:
        assert group["lr"] == 0.0123 and tuple(group["betas"]) == (0.5, 0.75)
    assert torch.is_tensor(next(iter(fresh_opt.state.values()))["exp_avg"])


def test_each_worker_group_start_decides_its_checkpoint_once(run):
    """The dataset factory decides where a worker-group start continues, once for all the
    workers, and sends it with their stream: at the first start the driver's point (its
    checksums verified), at a later one (a restart after a failure) the newest checkpoint."""
    from ray.data import DataContext

    from pipeline.train.failures import Fatal
    from pipeline.train.run import TrainData
    from pipeline.train.spec import GroupStart, group_start

    class Stream:
        """A dataset as far as the factory and a worker's shard see it: its context."""

        def __init__(self):
            self.context = DataContext()

        def get_context(self):
            return self.context

    cfg, _, _ = tiny_run()
    driver = checkpoints.ResumePoint("own", str(run / "step_00000020"))
    factory = TrainData(cfg, str(run), None, None, None, "", first=driver, dataset=Stream())
    assert group_start(factory()) == GroupStart(driver)
    assert group_start(factory()) == GroupStart(
        checkpoints.ResumePoint("own", str(run / "step_00000030")))
    with pytest.raises(Fatal, match="the training stream came without its start point"):
        group_start(Stream())
