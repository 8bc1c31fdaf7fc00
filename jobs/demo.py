"""The whole product on one machine, from a fresh clone (the README's first command).

In order:

    1. a local stack on 127.0.0.1: Ray head with job submission, S3 endpoint, MLflow server
       (infra/local_stack.py);
    2. demo shards: synthetic JPEGs as WebDataset shards (jobs/make_shards.py);
    3. two small pretraining runs through `ray job submit` (jobs/pretrain.py), differing in
       learning rate;
    4. generated tasks in the VTAB-1k layout, and `eval/vtab.py` on both checkpoints, also
       through `ray job submit`;
    5. the VTAB table of each, a comparison of the runs (eval/compare.py), and how to open
       MLflow;
    6. the first run exported for Hugging Face transformers and timm (jobs/export.py), and
       the transformers one loaded there, its logits against ours;
    7. the first run inspected as the paper's §4.5 does (jobs/analyze.py): attention
       distance per layer and head, attention rollout, position-embedding similarity,
       embedding filters, as files and as an MLflow run linked to the pretraining run.
    The stack is stopped at the end, whatever happens; results stay under --root.

    python jobs/demo.py              # ~2.5 minutes on 2 CPU cores
    python jobs/demo.py --smoke      # shorter runs, one VTAB learning rate (CI)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from infra import local_stack

ROOT = Path(__file__).resolve().parents[1]

DEMO_TASKS = ("eurosat", "kitti", "dsprites_ori")


STEP_STARTS: list[float] = []     # when each step began, for the closing line's timings


def step(n: int, total: int, text: str) -> float:
    print(f"[{n}/{total}] {text}", flush=True)
    STEP_STARTS.append(time.monotonic())
    return STEP_STARTS[-1]


def step_times(end: float) -> str:
    """-> "1: 21 s, 2: 3 s, ..." for the steps begun so far, the last one ending at `end`."""
    ends = [*STEP_STARTS[1:], end]
    return ", ".join(f"{i}: {e - s:.0f} s"
                     for i, (s, e) in enumerate(zip(STEP_STARTS, ends, strict=True), 1))


def submit(script: str, args: list[str], env: dict, log: Path) -> str:
    """`ray job submit` and wait; the job's output goes to `log`; -> that output."""
    from pipeline.tracking import GIT_COMMIT_ENV, git_commit

    # The job's copy of the checkout has no .git: the commit travels as a variable.
    runtime_env = json.dumps({"env_vars": {
        **{k: env[k] for k in ("MLFLOW_TRACKING_URI", "RAY_AUTH_MODE") if k in env},
        GIT_COMMIT_ENV: git_commit()}})
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
           env["RAY_ADDRESS"], "--working-dir", str(ROOT), "--runtime-env-json", runtime_env,
           "--", "python", script, *args]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                         cwd=ROOT)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: `{script}` failed (full log: {log}):\n{tail}")
    return out.stdout


def concurrently(jobs: dict[str, tuple[str, list[str], Path]], env: dict) -> dict[str, str]:
    """`submit` each of `jobs` (name -> script, args, log) at once and wait for all; the
    first failure is raised once all have ended. -> each job's output, by name."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(submit, script, args, env, log)
                   for name, (script, args, log) in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


def main(argv=None) -> int:
    from pipeline import cli

    ap = cli.parser(__doc__, prog="vit-demo")
    ap.add_argument("--out", type=Path, default=Path("~/vit-runs/demo-product"),
                    help="where everything goes: shards, runs, evaluations, the stack's state")
    ap.add_argument("--smoke", action="store_true",
                    help="shorter runs, one VTAB learning rate (no selection): for CI")
    cli.add_common(ap, mlflow=False)
    cli.deprecated(ap, "--root", "--out", type=Path)
    args = ap.parse_args(argv)
    cli.configure_logging(args.log_level)
    # This command says where the runs are; MLflow need not print a URL per run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    root = args.out.expanduser().resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    pre_steps, ft_steps = (40, 15) if args.smoke else (150, 60)
    total, t0 = 8, time.monotonic()

    step(1, total, "starting the local stack (Ray head, S3 endpoint, MLflow server)")
    stack_dir = root / "stack"
    local_stack.down(stack_dir)                       # a stack left by an interrupted demo
    state = local_stack.up(stack_dir, num_cpus=4)
    env = local_stack.settings(state)
    try:
        step(2, total, "writing demo shards (synthetic JPEGs, 10 classes)")
        shards = root / "shards"
        from jobs.make_shards import main as make_shards

        if make_shards(["synthetic", "--out", str(shards), "--num-samples", "2048",
                        "--num-classes", "10", "--image-size", "64", "--shard-size-mb", "1"
                        ]) != 0:
            raise SystemExit("error: writing the demo shards failed")

        runs = {"demo-a": "0.002", "demo-b": "0.0005"}
        step(3, total, f"pretraining two small ViTs ({pre_steps} steps each, lr "
                       f"{' vs '.join(runs.values())}) through `ray job submit`")
        # The two jobs run side by side on the head, as a team sharing a cluster would.
        outs = concurrently({name: ("jobs/pretrain.py", [
            "--preset", "smoke", "--data", str(shards), "--name", name,
            "--out", str(root / "runs"), "--set", f"optim.lr={lr}",
            "--set", f"train.total_steps={pre_steps}",
            "--set", f"checkpoint.every={pre_steps}"], root / "logs" / f"pretrain-{name}.log")
            for name, lr in runs.items()}, env)
        for name, out in outs.items():
            line = next((ln for ln in out.splitlines() if "finished at step" in ln), "")
            print(f"      {name}: {line.strip()}")

        step(4, total, "evaluating both on generated VTAB-1k-layout tasks "
                       f"({', '.join(DEMO_TASKS)}) with eval/vtab.py")
        from eval.data import write_grating_task
        from eval.tasks import BY_NAME

        vtab = root / "vtab-1k"
        for i, name in enumerate(DEMO_TASKS):
            if not (vtab / name / "test.txt").exists():
                write_grating_task(vtab, BY_NAME[name], train=40, val=10, test=60,
                                   image_size=40, seed=i)
        concurrently({name: ("eval/vtab.py", [
            "--checkpoint", str(root / "runs" / name), "--data", str(vtab),
            "--preset", "demo", "--tasks", ",".join(DEMO_TASKS),
            "--set", f"finetune.steps={ft_steps}",
            # Smoke: one rate, so no selection phase (the test of the protocol has it).
            *(["--lrs", "0.03"] if args.smoke else []),
            "--out", str(root / "vtab"), "--name", f"vtab-{name}",
            "--reference", "vit-l16-i21k"], root / "logs" / f"vtab-{name}.log")
            for name in runs}, env)
        tables = {name: (root / "vtab" / f"vtab-{name}" / "vtab.txt").read_text()
                  for name in runs}

        step(5, total, "VTAB-1k tables")
        for name, table in tables.items():
            print(f"\n--- {name} ---\n{table}")

        step(6, total, "comparing the runs (eval/compare.py)")
        from eval.compare import compare

        out = compare(env["MLFLOW_TRACKING_URI"],
                      ["vtab-demo-a", "vtab-demo-b", "demo-a", "demo-b"],
                      out_dir=root / "comparison")
        print(out["text"])
        print(f"\n  written: {out['csv']} (and .png)")

        step(7, total, "exporting demo-a for Hugging Face transformers and timm")
        export_demo(root / "runs" / "demo-a", root / "exports")

        step(8, total, "inspecting demo-a as the paper's §4.5 does (jobs/analyze.py)")
        inspect_demo(root / "runs" / "demo-a", shards, root / "analysis" / "demo-a", env,
                     root / "logs" / "analyze-demo-a.log")
    finally:
        local_stack.down(stack_dir)
    now = time.monotonic()
    print(f"\nDone in {now - t0:.0f} s (by step: {step_times(now)}). Everything is under "
          f"{root}:")
    print(f"  checkpoints: {root / 'runs'}   VTAB reports: {root / 'vtab'}   logs: "
          f"{root / 'logs'}")
    print("  MLflow (the runs, the nested VTAB runs, the comparison run, the analysis run):")
    print(f"    {Path(sys.executable).parent / 'mlflow'} server --backend-store-uri "
          f"sqlite:///{stack_dir / 'mlflow.db'} --artifacts-destination "
          f"{stack_dir / 'mlartifacts'} --port 5000")
    print("    then open http://127.0.0.1:5000 (experiments vit-smoke, vtab, comparisons, "
          "analysis)")
    return 0


def inspect_demo(run: Path, images: Path, out: Path, env: dict, log: Path) -> None:
    """jobs/analyze.py as a person runs it (plain PyTorch, no Ray job), logging to the
    stack's MLflow; prints its per-layer table and where the pictures are."""
    cmd = [sys.executable, str(ROOT / "jobs" / "analyze.py"), "--checkpoint", str(run),
           "--data", str(images), "--num-images", "128", "--out", str(out)]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=ROOT)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: `jobs/analyze.py` failed (full log: {log}):\n{tail}")
    table = "mean attention distance" + done.stdout.split("mean attention distance", 1)[-1]
    print("\n".join("  " + line for line in table.split("\n\nWritten to", 1)[0].splitlines()))
    print(f"  pictures: {out}/{{attention_distance,attention_rollout,"
          f"position_embedding_similarity,embedding_filters}}.png")


def export_demo(run: Path, out: Path) -> None:
    import torch

    from pipeline.weights import export_vit, load_vit, resolve_checkpoint

    ckpt = resolve_checkpoint(str(run))
    for fmt in ("hf", "timm"):
        print(f"  {fmt:4s} -> {export_vit(ckpt, out / fmt, fmt)}")
    try:
        from transformers import ViTForImageClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        print("  (transformers is not installed: pip install transformers to load the export)")
        return
    ours = load_vit(ckpt).eval()
    theirs = ViTForImageClassification.from_pretrained(str(out / "hf")).eval()
    x = torch.rand(4, 3, ours.cfg.image_size, ours.cfg.image_size) * 2 - 1
    with torch.no_grad():
        diff = (theirs(pixel_values=x).logits - ours(x)).abs().max().item()
    print(f"  transformers.ViTForImageClassification.from_pretrained({out / 'hf'}): logits "
          f"within {diff:.1e} of ours")


if __name__ == "__main__":
    sys.exit(main())
