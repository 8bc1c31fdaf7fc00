"""The import rules of the codebase: jobs -> eval -> pipeline, never backwards;
Ray stays at the edges; nobody writes `import eval` (it shadows the builtin)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Plain PyTorch modules that must import (and unit-test) without Ray (pipeline/weights/ too:
# see test_weights_import_neither_ray_nor_training).
NO_RAY = ("pipeline/model.py", "pipeline/perf.py", "pipeline/analysis.py",
          "pipeline/data/plan.py", "pipeline/data/probe.py",
          "eval/tasks.py", "eval/data.py", "eval/finetune.py", "eval/report.py")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)      # and `from pipeline import train` as pipeline.train
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_pipeline_never_imports_eval_or_jobs():
    for path in python_files("pipeline"):
        bad = {m for m in imports(path) if m.split(".")[0] in ("eval", "jobs")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_data_never_imports_training():
    """pipeline/data feeds pipeline/train and eval alike: what both need lives in data."""
    for path in python_files("pipeline/data"):
        bad = {m for m in imports(path) if m.startswith("pipeline.train")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_eval_never_imports_jobs():
    for path in python_files("eval"):
        bad = {m for m in imports(path) if m.split(".")[0] == "jobs"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_nobody_writes_import_eval():
    for folder in ("pipeline", "eval", "jobs", "tests", "bench", "infra"):
        for path in python_files(folder):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    assert all(a.name != "eval" and not a.name.startswith("eval.")
                               for a in node.names), f"`import eval` in {path}"


def test_model_and_checkpoint_do_not_import_ray():
    for rel in NO_RAY:
        bad = {m for m in imports(ROOT / rel) if m.split(".")[0] == "ray"}
        assert not bad, f"{rel} imports {bad}"


def test_weights_import_neither_ray_nor_training():
    """Evaluation, export and analysis read weights (and find a run's newest checkpoint)
    through pipeline.weights: it sits below the training code, not beside it."""
    paths = python_files("pipeline/weights")
    assert paths, "pipeline/weights/ is missing"
    for path in paths:
        bad = {m for m in imports(path)
               if m.split(".")[0] == "ray" or m == "pipeline.train" or
               m.startswith("pipeline.train.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_eval_never_imports_training():
    """Evaluation and pretraining are two halves over one library: what both need (config
    machinery, schedule, weights and checkpoint resolution, console helpers) lives below
    both, so the evaluation never reaches into the training package."""
    for path in python_files("eval"):
        bad = {m for m in imports(path) if m == "pipeline.train" or
               m.startswith("pipeline.train.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


_DRIVER = r'''
import sys, ray.cloudpickle as pickle
sys.argv = ["vit-pretrain"]
import jobs.pretrain as cmd                       # the command's own imports
from eval import handoff
from pipeline.train import preflight, run
from pipeline.train.config import PRESETS

cfg = cmd.resolve(cmd.parse_args(["--preset", "smoke", "--out", sys.argv_out]))
preflight.check(cfg, resume=None, init=None, mlflow=False)
handoff.check(cfg)
factory, plan, _, _ = run.build_data(cfg, cfg.run.storage + "/smoke", None, None)
spec = run.WorkerSpec(cfg=cfg, run_uri=cfg.run.storage + "/smoke", stream=plan)
trainer = run.make_trainer(cfg, spec, factory, cfg.run.storage)
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
assert isinstance(trainer, DataParallelTrainer) and trainer.backend_config.backend == "gloo"
# What Ray Train's controller is handed: the training function, its config, the dataset
# factory, the backend (the controller builds its callbacks from these).
shipped = pickle.dumps((trainer.train_loop_per_worker, trainer.train_loop_config,
                        trainer.datasets, trainer.backend_config, trainer.data_config))
open(sys.argv_pickle, "wb").write(shipped)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
'''

_CONTROLLER = r'''
import sys, ray.cloudpickle as pickle
import ray.train.v2._internal.execution.controller  # what the controller process imports
fn, config, datasets, backend, data_config = pickle.loads(open(sys.argv[1], "rb").read())
backend.backend_cls()
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
'''


def test_the_driver_and_the_train_controller_never_import_torch(tmp_path):
    """torch's import is ~1.2 s on 2 cores; the command's driver and Ray Train's controller
    (which unpickles the training function, its config, the dataset factory and the backend)
    never touch a tensor, so neither pays it (pipeline/train/backend.py). The objects are the
    ones `vit-pretrain --preset smoke` builds, pickled as Ray pickles them."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = _DRIVER.replace("sys.argv_out", repr(str(tmp_path / "runs"))).replace(
        "sys.argv_pickle", repr(str(tmp_path / "shipped.pkl")))
    for name, script, args in (("driver", driver, []),
                               ("controller", _CONTROLLER, [str(tmp_path / "shipped.pkl")])):
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == "[]", \
            f"the {name} imports {done.stdout.strip().splitlines()[-1][:300]}"
