"""Work that cannot fit the cluster: refused at once where the cluster cannot grow, waited for
(with a countdown, up to a limit) where an autoscaler can add nodes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import resources
from pipeline.model import ViT, ViTConfig
from pipeline.weights import save_vit
from tests.eval.test_vtab import make_tasks

ROOT = Path(__file__).resolve().parents[2]


def test_placement_packs_whole_bundles_and_keeps_a_cpu_for_the_data():
    two_cpus = [{"CPU": 2.0, "GPU": 0.0}]
    assert resources.place([{"CPU": 1.0}], 1.0, two_cpus)
    assert not resources.place([{"CPU": 1.0}] * 2, 1.0, two_cpus)      # no CPU left for data
    assert resources.place([{"CPU": 0.5}] * 2, 1.0, two_cpus)
    gpus = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert resources.place([{"CPU": 1.0, "GPU": 1.0}] * 2, 1.0, gpus)
    assert not resources.place([{"CPU": 1.0, "GPU": 1.0}] * 3, 1.0, gpus)
    # a worker is one bundle: two half-free nodes do not make one whole GPU
    assert not resources.place([{"CPU": 1.0, "GPU": 1.0}], 0.0,
                               [{"CPU": 4.0, "GPU": 0.5}, {"CPU": 4.0, "GPU": 0.5}])
    assert not resources.place([{"CPU": 1.0}] * 2, 0.0, [{"CPU": 4.0, "GPU": 0.0}], spread=True)


def test_a_cluster_that_cannot_grow_refuses_at_once():
    start = time.monotonic()
    with pytest.raises(resources.DoesNotFit) as err:
        resources.ensure_fits([{"CPU": 1.0}] * 2, 1.0, what="2 workers x 1 CPU",
                              fix="lower --cpus-per-worker", wait_s=600,
                              capacity=lambda: [{"CPU": 2.0, "GPU": 0.0}],
                              growable=lambda: False)
    assert time.monotonic() - start < 1
    assert str(err.value) == ("2 workers x 1 CPU do not fit on this cluster (1 node with 2 CPU "
                              "in all), which cannot grow (a local Ray, or no autoscaler); "
                              "lower --cpus-per-worker")


def test_a_growing_cluster_is_waited_for_with_a_countdown_up_to_the_limit(caplog):
    polls = iter([[{"CPU": 2.0, "GPU": 0.0}]] * 3 + [[{"CPU": 2.0, "GPU": 0.0}] * 2] * 9)
    resources.ensure_fits([{"CPU": 2.0}], 1.0, what="1 worker x 2 CPU", fix="-", wait_s=5,
                          capacity=lambda: next(polls), growable=lambda: True, every_s=0.1)
    waits = [r.getMessage() for r in caplog.records if "waiting for the cluster" in r.message]
    assert len(waits) == 3 and "s left (scale.wait_for_resources_s)" in waits[0]
    with pytest.raises(resources.DoesNotFit, match="which did not grow in 0.3 s; -$"):
        resources.ensure_fits([{"CPU": 4.0}], 0.0, what="1 worker x 4 CPU", fix="-",
                              wait_s=0.3, capacity=lambda: [{"CPU": 2.0, "GPU": 0.0}],
                              growable=lambda: True, every_s=0.1)


@pytest.mark.ray
def test_a_local_ray_cannot_grow(ray_local):
    """A local Ray's monitor writes a status without an autoscaler report: not growable."""
    assert resources.can_grow() is False
    assert resources.nodes() == [{"CPU": 4.0, "GPU": 0.0}]       # the fixture's 4 CPUs


@pytest.mark.slow
@pytest.mark.ray
def test_commands_refuse_workers_and_trials_no_node_can_hold(tmp_path):
    """On a local Ray (it cannot grow), workers or a trial larger than the machine stop the
    command in seconds with the numbers and the fix, instead of waiting forever; nothing is
    logged to MLflow."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("RAY_ADDRESS", None)
    torch.manual_seed(0)
    checkpoint = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=1,
                                        num_heads=2, mlp_dim=64, num_classes=10)),
                          tmp_path / "ckpt")
    data = make_tasks(tmp_path / "vtab-1k", ("kitti",), train=8, val=4, test=8)
    cpus = str(4 * (os.cpu_count() or 1))
    out = subprocess.run([sys.executable, "jobs/pretrain.py", "--preset", "smoke", "--workers",
                          "2", "--cpus-per-worker", cpus, "--out", str(tmp_path / "runs")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stderr[-3000:]
    assert last.startswith(f"error: 2 workers x {cpus} CPU, plus 1 CPU for the data tasks") \
        and "which cannot grow" in last and "--cpus-per-worker" in last, last
    assert not (tmp_path / "mlflow.db").exists()          # refused before any MLflow run

    vtab = subprocess.run([sys.executable, "eval/vtab.py", "--checkpoint", str(checkpoint),
                           "--data", str(data), "--tasks", "kitti", "--cpus-per-trial", cpus,
                           "--out", str(tmp_path / "ev"), "--no-mlflow"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = vtab.stderr.strip().splitlines()[-1]
    assert vtab.returncode == 2, vtab.stderr[-3000:]
    assert last.startswith(f"error: trials of {cpus} CPU each do not fit") and \
        "--cpus-per-trial" in last, last
