"""`jobs/analyze.py`: every output from a pretraining-style checkpoint, the MLflow run linked to
its pretraining run (a real tracking server), an import from Hugging Face format, and bad
input as one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.analyze import main
from pipeline.model import ViT
from pipeline.train.config import PRESETS
from pipeline.weights import export_vit, save_vit

OUTPUTS = ["attention.json", "attention_distance.png", "attention_rollout.png",
           "embedding_filters.png", "position_embedding_similarity.png"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from jobs.make_shards import main as make_shards

    out = tmp_path_factory.mktemp("shards")
    assert make_shards(["synthetic", "--out", str(out), "--num-samples", "48", "--num-classes",
                        "4", "--image-size", "40"]) == 0
    return out


def smoke_model(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    model = ViT(PRESETS["smoke"]().model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.mlflow
@pytest.mark.slow            # the session's MLflow server takes ~15 s to start
def test_writes_every_output_and_an_mlflow_run_linked_to_the_pretraining_run(
        tmp_path, shards, mlflow_server, monkeypatch, capsys):
    client = MlflowClient(mlflow_server.uri)
    pretrain = client.create_run(client.create_experiment(f"vit-smoke-{tmp_path.name}"),
                                 run_name="smoke-x").info.run_id
    ckpt = tmp_path / "runs" / "smoke-x" / "step_00000150"
    save_vit(smoke_model(), ckpt, {"step": 150, "run_name": "smoke-x",
                                   "mlflow_run_id": pretrain})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--data", str(shards), "--num-images", "20",
                 "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    doc = json.loads((out / "attention.json").read_text())
    assert (doc["image_size"], doc["patch_size"], doc["num_images"], doc["grid"]) == (
        32, 8, 20, 4)
    d = np.array(doc["mean_distance"])
    assert d.shape == (2, 2)                                   # smoke: 2 layers x 2 heads
    assert (d > 0).all() and (d < np.hypot(24, 24)).all()
    assert len(doc["rollout"]["over_patches"]) == 6
    # The terminal table: one row per layer with min / mean / max over the heads.
    for layer, row in enumerate(d, 1):
        assert f"{layer:5d}  {row.min():7.1f}  {row.mean():7.1f}  {row.max():7.1f}" in printed
    assert "20/20 images" in printed
    # MLflow: a run in `analysis`, tagged with the pretraining run, holding the same files.
    exp = client.get_experiment_by_name("analysis")
    runs = client.search_runs([exp.experiment_id], f"tags.pretrain_run_id = '{pretrain}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["vit.kind"] == "analysis" and run.data.tags["pretrain_step"] == "150"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == OUTPUTS
    hist = sorted((m.step, m.value) for m in
                  client.get_metric_history(run.info.run_id, "attention_distance/mean"))
    np.testing.assert_allclose([v for _, v in hist], d.mean(1), rtol=1e-4)
    assert [s for s, _ in hist] == [1, 2]
    assert run.info.run_id in printed


def test_another_resolution_and_an_import_from_hugging_face_format(tmp_path, shards):
    ours = tmp_path / "ours"
    save_vit(smoke_model(1), ours)
    hf = export_vit(ours, tmp_path / "hf", "hf")
    results = {}
    for name, ckpt in (("ours", ours), ("hf", hf)):
        out = tmp_path / f"out-{name}"
        assert main(["--checkpoint", str(ckpt), "--data", str(shards), "--num-images", "12",
                     "--resolution", "48", "--out", str(out), "--no-mlflow"]) == 0
        results[name] = json.loads((out / "attention.json").read_text())
    a, b = results["ours"], results["hf"]
    assert a["grid"] == 6 and a["image_size"] == 48 and a["trained_image_size"] == 32
    assert np.array(a["rollout"]["over_patches"]).shape == (6, 6, 6)
    # The learned position embedding (4 x 4), not the resampled one, is what is drawn.
    assert a["pos_embed"]["grid"] == 4
    np.testing.assert_allclose(a["mean_distance"], b["mean_distance"], rtol=1e-4)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, shards, capsys):
    good = tmp_path / "ckpt"
    save_vit(smoke_model(), good)
    not_vit = tmp_path / "resnet"
    not_vit.mkdir()
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
              str(not_vit / "model.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0.jpg").write_bytes(b"not a jpeg at all")
    cases = [
        (["--checkpoint", str(not_vit), "--data", str(shards)], "not"),
        (["--checkpoint", str(tmp_path / "nothing"), "--data", str(shards)], "not found"),
        (["--checkpoint", str(good), "--data", str(empty)], "no images found"),
        (["--checkpoint", str(good), "--data", str(broken)], "cannot be decoded"),
        (["--checkpoint", str(good), "--data", str(shards), "--split", "nosuch"], "no split"),
    ]
    for args, words in cases:
        out = tmp_path / "out"
        assert main([*args, "--out", str(out), "--no-mlflow"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (args, err)
        assert not out.exists()
