"""Pretraining hands its checkpoints to VTAB-1k itself (the `eval` section, eval/handoff.py):
the section's bad input is refused before Ray starts; which checkpoints are queued. A smoke
pretraining with `eval.at_end` writing its VTAB report, interrupted and resumed:
tests/jobs/test_interrupts.py; on a cluster, during training: tests/jobs/test_pretrain_job.py."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vtab_data(tmp_path_factory) -> Path:
    from eval.data import write_grating_task
    from eval.tasks import BY_NAME

    root = tmp_path_factory.mktemp("vtab")
    for name in ("eurosat", "dtd"):
        write_grating_task(root, BY_NAME[name], train=40, val=20, test=30, image_size=32)
    return root


@pytest.mark.parametrize("sets, says", [
    (["eval.protocol=nope"], "eval.protocol 'nope' is not a vit-vtab preset"),
    (["eval.tasks=eurosat,nosuchtask"], "nosuchtask"),
    (["eval.resolution=4"], "below the model's patch size 8"),
])
def test_bad_eval_settings_are_refused_before_ray(job, vtab_data, sets, says):
    args = ["--set", "eval.at_end=true", "--set", f"eval.data={vtab_data}",
            "--set", "eval.tasks=eurosat"]
    for item in sets:
        args += ["--set", item]
    code, out, err = job(*args)
    assert code == 2, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], err[-2000:]
    assert "Ray started" not in err and "resolved config" not in out


def test_a_missing_vtab_task_is_refused_before_ray(job, vtab_data):
    code, out, err = job("--set", "eval.at_end=true", "--set", f"eval.data={vtab_data}",
                         "--set", "eval.tasks=eurosat,kitti")
    assert code == 2 and "kitti" in err and "Ray started" not in err, err[-2000:]


def test_no_eval_section_checks_nothing(job, tmp_path):
    """Off by default: a missing VTAB folder is no concern of a run that evaluates nothing
    (the tripwire is reached: everything before Ray passed)."""
    code, out, err = job("--set", f"eval.data={tmp_path}/none")
    assert "resolved config" in out and "Ray started" in err


def test_every_nth_checkpoint_by_count_is_queued_once_unless_already_reported(tmp_path):
    """eval.vtab_every=2: the 2nd, 4th, 6th checkpoint the run wrote, whatever made it (steps
    17 and 36 here by checkpoint.minutes). Of an earlier start's (before the first poll): the
    one without a report (a start stopped during its evaluation) is queued, the reported one
    not. Each once. On one machine the queue waits for the end of training (no Ray here)."""
    from eval.handoff import Handoff, vtab_config
    from pipeline.train import checkpoints
    from pipeline.train.config import apply_overrides, smoke
    from tests.pipeline.train.test_units import _write, tiny_run

    runs = tmp_path / "runs"
    cfg = apply_overrides(smoke(), ["eval.vtab_every=2", f"run.storage={runs}",
                                    f"eval.data={tmp_path / 'vtab'}"])
    run = runs / "r"
    tiny, model, opt = tiny_run()

    def write(*numbered):
        for number, step in numbered:
            _write(run / checkpoints.dir_name(step), tiny, model, opt, step, number=number)

    write((1, 10), (2, 17), (4, 30))          # (the 3rd is gone: retention)
    report = Path(vtab_config(cfg, str(run / "step_00000030")).root) / "vtab.json"
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    hand = Handoff(cfg, str(run), on_cluster=False, mlflow=False)
    hand._poll()
    write((5, 36), (6, 40))
    hand._poll()
    hand._poll()
    assert [u.rsplit("/", 1)[-1] for u in hand.queued] == ["step_00000017", "step_00000040"]
    assert hand.refs == []
