"""The README's main command in its smoke form (`jobs/demo.py --smoke`): the whole product on
a local stack, from shards to the VTAB tables and the comparison, leaving no process. Its
pretraining and VTAB jobs go through `ray job submit --working-dir` to the stack's head: the
suite's test of `eval/vtab.py` as a submitted job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.infra.test_infra import _cmdlines

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.mlflow]


def test_demo_smoke(tmp_path):
    root = tmp_path / "demo"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "demo.py"), "--smoke", "--out",
                          str(root)], env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    for n in range(1, 9):
        assert f"[{n}/8]" in out.stdout
    assert out.stdout.count('Mean of tasks (ViT Table 9 "Mean")') >= 2     # two VTAB tables
    assert "VTAB-1k top-1 (%), differences to vtab-demo-a" in out.stdout  # the comparison
    assert "Pretraining runs" in out.stdout and "optim.lr" in out.stdout
    assert "then open http://127.0.0.1:5000" in out.stdout
    # The export step: both formats written, the transformers one with our logits.
    found = re.search(r"logits within ([0-9.e+-]+) of ours", out.stdout)
    assert found and float(found.group(1)) < 1e-4, out.stdout[-2000:]
    assert (root / "exports" / "hf" / "preprocessor_config.json").exists()
    assert (root / "exports" / "timm" / "config.json").exists()

    # The inspection step: every output, and its table printed.
    analysis = root / "analysis" / "demo-a"
    assert sorted(p.name for p in analysis.iterdir()) == [
        "attention.json", "attention_distance.png", "attention_rollout.png",
        "embedding_filters.png", "position_embedding_similarity.png"]
    doc = json.loads((analysis / "attention.json").read_text())
    assert doc["num_images"] == 128 and len(doc["mean_distance"]) == 2
    assert "layer      min     mean      max" in out.stdout
    for name in ("demo-a", "demo-b"):
        report = json.loads((root / "vtab" / f"vtab-{name}" / "vtab.json").read_text())
        assert [t["task"] for t in report["tasks"]] == ["eurosat", "kitti", "dsprites_ori"]
        assert (root / "runs" / name / "step_00000040" / "model.safetensors").exists()
    # What MLflow recorded (the stack is down; its store is on disk).
    client = MlflowClient(f"sqlite:///{root / 'stack' / 'mlflow.db'}")
    vtab = client.get_experiment_by_name("vtab")
    parents = client.search_runs([vtab.experiment_id], "tags.`vit.kind` = 'vtab'")
    assert sorted(r.info.run_name for r in parents) == ["vtab-demo-a", "vtab-demo-b"]
    pretrain = {r.info.run_name: r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("vit-smoke").experiment_id])}
    for parent in parents:
        assert parent.data.tags["pretrain_run_id"] == pretrain[parent.info.run_name[5:]]
    # Through `ray job submit` the uploaded copy has no .git: the commit came from the
    # submitting side, and MLflow knows the runs as jobs.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    for run_id in pretrain.values():
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.source.git.commit"].startswith(head), tags
        assert tags["mlflow.source.type"] == "JOB"
    assert client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
    analysis_exp = client.get_experiment_by_name("analysis").experiment_id
    inspected = client.search_runs([analysis_exp])
    assert [r.data.tags["pretrain_run_id"] for r in inspected] == [pretrain["demo-a"]]
    # The server kept its artifacts under --artifacts-destination (the stack is down).
    stored = root / "stack" / "mlartifacts" / analysis_exp / inspected[0].info.run_id
    assert sorted(p.name for p in (stored / "artifacts").iterdir()) == sorted(
        p.name for p in analysis.iterdir())

    # No process left behind: the state file is gone and nothing runs from the stack.
    assert not (root / "stack" / "state.json").exists()
    assert not [c for c in _cmdlines() if str(root) in c and "pytest" not in c]
