"""Compare MLflow runs side by side: VTAB evaluations and pretraining runs.

    python eval/compare.py RUN [RUN ...]                  # run ids, names or their prefixes
    python eval/compare.py --experiment vtab              # every finished run of an experiment
    python eval/compare.py --experiment vit-smoke --filter "params.\\`optim.lr\\` = '0.001'"

VTAB runs (experiment `vtab`): top-1 per task, per group, the mean of the tasks and the mean
of the group means, each with its difference to the first run, and the pretraining settings
that differ (their `pretrain.*` params). Pretraining runs: final loss, few-shot accuracy,
the VTAB-1k means of their newest evaluated checkpoint, images/s, MFU, and the config values
that differ. A run is named by its id, its name, or the start of a top-level run's name that
no other run's shares. Printed as
tables, written as CSV and a PNG (training-loss curves overlaid; VTAB group bars), and logged
to MLflow as a run of the experiment `comparisons` (the runs compared are its params).
MLFLOW_TRACKING_URI chooses the server (default: the local store under ~/vit-runs).
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

from eval.tasks import TASKS
from pipeline import cli, tracking

PRETRAIN_METRICS = (("train/loss", "final loss", "last"), ("perf/images_per_sec", "images/s",
                                                           "mean"),
                    ("perf/mfu", "MFU", "mean"))
SUMMARY = (("natural", "Natural"), ("specialized", "Specialized"), ("structured", "Structured"),
           ("mean", "Mean of tasks"), ("mean_of_groups", "Mean of group means"))


CompareError = tracking.RunNotFound


def resolve_runs(uri: str, refs: list[str], experiment: str | None, filter_string: str = ""
                 ) -> list:
    runs = tracking.find_runs(uri, refs, experiment, filter_string)
    if len(runs) < 2:
        raise CompareError(f"need at least two runs to compare, found {len(runs)}")
    return runs


def label(run) -> str:
    return run.info.run_name or run.info.run_id[:8]


def is_vtab(run) -> bool:
    """A VTAB evaluation (pretraining runs hold vtab/ metrics too: their checkpoints')."""
    kind = run.data.tags.get("vit.kind")
    if kind:
        return kind == "vtab"
    return "train/loss" not in run.data.metrics and \
        any(k.startswith("vtab/") for k in run.data.metrics)


def vtab_rows(runs) -> list[tuple[str, list[float | None]]]:
    """(row name, value per run) for the tasks any run has, then groups and means."""
    rows = []
    for task in TASKS:
        values = [r.data.metrics.get(f"vtab/{task.name}/top1") for r in runs]
        if any(v is not None for v in values):
            rows.append((task.name, values))
    for key, name in SUMMARY:
        values = [r.data.metrics.get(f"vtab/{key}") for r in runs]
        if any(v is not None for v in values):
            rows.append((name, values))
    keys = sorted({k for r in runs for k in r.data.params if k.startswith("pretrain.")})
    for k in keys:
        values = [r.data.params.get(k) for r in runs]
        if len(set(values)) > 1 and k not in ("pretrain.run.name", "pretrain.resume",
                                              "pretrain.init"):
            rows.append((k, values))
    return rows


def pretrain_rows(uri: str, runs) -> list[tuple[str, list]]:
    rows = []
    for key, name, how in PRETRAIN_METRICS:
        values = []
        for r in runs:
            if how == "last":
                values.append(r.data.metrics.get(key))
            else:
                hist = [v for _, v in tracking.metric_history(uri, r.info.run_id, key)]
                values.append(sum(hist) / len(hist) if hist else None)
        if any(v is not None for v in values):
            rows.append((name, values))
    fewshot = sorted({k for r in runs for k in r.data.metrics
                      if k.startswith("fewshot/") and "/seed" not in k})     # the seeds' means
    rows += [(k, [r.data.metrics.get(k) for r in runs]) for k in fewshot]
    for key, name in (("mean", "VTAB-1k mean"), ("mean_of_groups", "VTAB-1k mean of groups")):
        values = [r.data.metrics.get(f"vtab/{key}") for r in runs]   # the newest checkpoint's
        if any(v is not None for v in values):
            rows.append((name, values))
    rows.append(("steps", [_last_step(uri, r) for r in runs]))
    keys = sorted({k for r in runs for k in r.data.params})
    for k in keys:
        values = [r.data.params.get(k) for r in runs]
        if len(set(values)) > 1 and k not in ("run.name", "resume", "init"):
            rows.append((k, values))
    return rows


def _last_step(uri: str, run):
    hist = tracking.metric_history(uri, run.info.run_id, "train/loss")
    return max((s for s, _ in hist), default=None)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
    text = str(v)
    return text if len(text) <= 20 else "..." + text[-17:]


def format_table(title: str, runs, rows, deltas: bool) -> str:
    names = [label(r) for r in runs]
    cells = []
    for _, values in rows:
        row = []
        for i, v in enumerate(values):
            cell = _cell(v)
            if deltas and i > 0 and isinstance(v, float) and isinstance(values[0], float):
                cell += f" ({v - values[0]:+.2f})"
            row.append(cell)
        cells.append(row)
    width = max([24] + [len(n) + 2 for n, _ in rows])
    col = max([12] + [len(n) for n in names] + [len(c) for row in cells for c in row]) + 2
    head = f"{'':<{width}}" + "".join(f"{n:>{col}}" for n in names)
    out = [title, head, "-" * len(head)]
    for (name, _), row in zip(rows, cells, strict=True):
        out.append(f"{name:<{width}}" + "".join(f"{c:>{col}}" for c in row))
    return "\n".join(out)


def to_csv(sections: list[tuple[str, list, list]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    for kind, runs, rows in sections:
        w.writerow([kind] + [r.info.run_id for r in runs])
        w.writerow(["run"] + [label(r) for r in runs])
        for name, values in rows:
            w.writerow([name] + ["" if v is None else v for v in values])
    return buf.getvalue()


def chart(uri: str, vtab_runs, pretrain_runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = bool(pretrain_runs) + bool(vtab_runs)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if pretrain_runs:
        ax = axes.pop(0)
        for r in pretrain_runs:
            hist = tracking.metric_history(uri, r.info.run_id, "train/loss")
            ax.plot([s for s, _ in hist], [v for _, v in hist], label=label(r))
        ax.set_xlabel("step")
        ax.set_ylabel("train/loss")
        ax.set_yscale("log")
        ax.set_title("pretraining loss")
        ax.legend(fontsize=8)
    if vtab_runs:
        ax = axes.pop(0)
        present = [(k, n) for k, n in SUMMARY
                   if any(f"vtab/{k}" in r.data.metrics for r in vtab_runs)]
        keys, names = [k for k, _ in present], [n for _, n in present]
        n = len(vtab_runs)
        for i, r in enumerate(vtab_runs):
            xs = [j + (i - (n - 1) / 2) * 0.8 / n for j in range(len(keys))]
            ax.bar(xs, [r.data.metrics.get(f"vtab/{k}", 0.0) for k in keys], width=0.8 / n,
                   label=label(r))
        ax.set_xticks(range(len(keys)), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 (%)")
        ax.set_title("VTAB-1k groups and means")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(tracking_uri: str, refs: list[str], experiment: str | None = None,
            filter_string: str = "", out_dir: str | Path | None = None, log: bool = True
            ) -> dict:
    """-> {"text", "csv", "png", "run_id"} (run_id of the comparison run, when logged)."""
    runs = resolve_runs(tracking_uri, refs, experiment, filter_string)
    vtab = [r for r in runs if is_vtab(r)]
    pre = [r for r in runs if not is_vtab(r)]
    sections, texts = [], []
    if len(vtab) >= 1:
        rows = vtab_rows(vtab)
        sections.append(("vtab", vtab, rows))
        texts.append(format_table(f"VTAB-1k top-1 (%), differences to {label(vtab[0])}",
                                  vtab, rows, deltas=True))
    if len(pre) >= 1:
        rows = pretrain_rows(tracking_uri, pre)
        sections.append(("pretraining", pre, rows))
        texts.append(format_table("Pretraining runs (config values that differ below the "
                                  "metrics)", pre, rows, deltas=False))
    out_dir = Path(out_dir or Path(tracking.LOCAL_ROOT).expanduser() / "comparisons" /
                   time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(texts)
    (out_dir / "comparison.txt").write_text(text + "\n")
    (out_dir / "comparison.csv").write_text(to_csv(sections))
    chart(tracking_uri, vtab, pre, out_dir / "comparison.png")
    result = {"text": text, "csv": out_dir / "comparison.csv", "png": out_dir / "comparison.png",
              "run_id": None}
    if log:
        result["run_id"] = tracking.log_comparison(
            tracking_uri, runs, " vs ".join(label(r) for r in runs),
            [out_dir / n for n in ("comparison.txt", "comparison.csv", "comparison.png")])
    return result


def main(argv=None) -> int:
    ap = cli.parser(__doc__, prog="vit-compare")
    ap.add_argument("runs", nargs="*", help="MLflow run ids, run names, or the start of a "
                                            "run's name that no other run's shares")
    ap.add_argument("--experiment", help="add the finished top-level runs of this experiment")
    ap.add_argument("--filter", default="", help="MLflow search filter for --experiment, e.g. "
                                                 "\"params.protocol = 'vit'\" (default: none)")
    ap.add_argument("--out", help="folder for comparison.{txt,csv,png} (default: "
                                  "~/vit-runs/comparisons/<time>)")
    cli.add_common(ap)
    cli.deprecated(ap, "--no-log", "--no-mlflow", nargs=0)
    args = ap.parse_args(argv)
    cli.configure_logging(args.log_level)
    # This command says where the runs are; MLflow need not print a URL per run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from pipeline.tracking import default_tracking_uri, how_to_open

    uri = default_tracking_uri()
    try:
        out = compare(uri, args.runs, args.experiment, args.filter, args.out,
                      log=not args.no_mlflow)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.BAD_INPUT
    print(out["text"])
    print(f"\nwritten: {out['csv']} and {out['png'].name} beside it")
    if out["run_id"]:
        print(f"MLflow comparison run: {out['run_id']} (experiment 'comparisons'); "
              f"{how_to_open(uri, out['run_id'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
