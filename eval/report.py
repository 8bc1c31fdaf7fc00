"""The VTAB-1k report: per task, per group, the mean of the 19 tasks (ViT Table 9's "Mean")
and the mean of the three group means (what parameter-efficient-tuning papers report), as a
terminal table, CSV, JSON and a PNG chart; and the MLflow parent run with one nested run per
task. Plain Python; matplotlib only for the chart.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import time
from pathlib import Path

from eval.errors import SweepError
from eval.tasks import BY_NAME, GROUPS, REFERENCE, summarize
from pipeline import storage

log = logging.getLogger("eval.vtab")

SUMMARY_ROWS = (("natural", "Natural"), ("specialized", "Specialized"),
                ("structured", "Structured"), ("mean", 'Mean of tasks (ViT Table 9 "Mean")'),
                ("mean_of_groups", "Mean of the group means (PETL papers)"))


REFERENCE_PROTOCOL = "paper: lr 0.01, 2500 steps, mean of 3 runs (ViT App. B.1.1)"


def choices(cfg, dropout: float | None = None) -> list[str]:
    """The protocol decisions the paper leaves open, as this run made them."""
    sweep, ft = cfg.sweep, cfg.finetune
    lrs = ", ".join(f"{lr:g}" for lr in sweep.lrs)
    if sweep.protocol == "paper":
        selection = "selection: none, lr 0.01 for every task (protocol paper, as Table 9)"
    else:
        selection = (f"selection: learning rates {{{lrs}}} fine-tuned on train800, scored on "
                     f"val200; "
                     + ("one rate for all tasks, the best on average (protocol vit)"
                        if sweep.protocol == "vit" else "the best rate per task (per-task)")
                     + ("" if len(sweep.lrs) > 1 else " (one rate given: no selection run)"))
    if sweep.protocol == "linear":
        test = f"the first {sweep.test_images}" if sweep.test_images else "all"
        return [
            f"no fine-tuning: a closed-form linear probe on the frozen pre-logits at "
            f"{ft.resolution} px, images resized only (protocol linear, eval/linear.py; the "
            f"solve of big_vision's fewshot_lsr)",
            "selection: the L2 regulariser (the lr column) from 2^-4..2^16, fit on train800 "
            "and scored on val200",
            f"final: refit on train800val200, top-1 on {test} test images",
            "averages: mean of the tasks (ViT) and, named separately, mean of the group means "
            "(PETL)",
        ]
    source = "--dropout" if ft.dropout is not None else (
        "vit_jax's value for the checkpoint: configs/augreg.py for AugReg ones, else "
        "configs/models.py")
    drop = [] if dropout is None else [
        f"dropout {dropout:g} while fine-tuning, attention dropout 0 ({source})"]
    return [
        f"resolution {ft.resolution} px for every task (ViT; not BiT's task-specific sizes, "
        f"not the 224 px of PETL papers)",
        "preprocessing: train = resize to 448/384 of the resolution, random crop, random "
        "flip, with BiT Supp. F's no-flip / no-crop exceptions; eval = resize; inputs in "
        "[-1, 1] (vit_jax), not ImageNet mean/std",
        "head: the whole pre-training head removed, one zero-initialised linear layer",
        f"optimizer: SGD momentum {ft.momentum:g}, batch {ft.batch_size}, {ft.steps} steps, "
        f"linear warmup {ft.warmup} steps then cosine decay, no weight decay, clip at global "
        f"norm {ft.grad_clip:g}",
        selection,
        *drop,
        f"final: retrained on train800val200 (800 + 200, not TA's first 1000 of trainval), "
        f"top-1 on test; {sweep.seeds} seed(s)"
        + (", mean and sample std" if sweep.seeds > 1 else ""),
        "averages: mean of the tasks (ViT) and, named separately, mean of the group means "
        "(PETL)",
    ]


def build(cfg, outcome: dict, pretrained_meta: dict, reference: str | None = None,
          dropout: float | None = None) -> dict:
    """The report document (what vtab.json holds). `dropout`: the fine-tuning dropout used."""
    sweep, ft = cfg.sweep, cfg.finetune
    final = outcome["final"]
    val = {}
    for r in outcome["selection"]:
        val.setdefault(r["task"], {})[f"{r['lr']:g}"] = r["top1"]
    tasks, per_seed = [], {}
    for name in sweep.tasks:
        runs = sorted((r for r in final if r["task"] == name), key=lambda r: r["seed"])
        scores = [r["top1"] for r in runs]
        for r in runs:
            per_seed.setdefault(r["seed"], {})[name] = r["top1"]
        row = {"task": name, "group": BY_NAME[name].group,
               "num_classes": BY_NAME[name].num_classes, "lr": outcome["lrs"][name],
               "val200": val.get(name, {}), "top1": statistics.fmean(scores),
               "std": statistics.stdev(scores) if len(scores) > 1 else None,
               "seeds": scores}
        if reference:
            row["reference"] = REFERENCE[reference].get(name)
        tasks.append(row)
    summary = summarize({t["task"]: t["top1"] for t in tasks})
    spread = {}
    if sweep.seeds > 1:   # the std of each aggregate over seeds, as the paper's "±"
        seeds = [summarize(s) for s in per_seed.values() if len(s) == len(sweep.tasks)]
        spread = {k: statistics.stdev([s[k] for s in seeds]) for k in summary} \
            if len(seeds) > 1 else {}
    doc = {"checkpoint": cfg.run.checkpoint, "name": cfg.run_name, "data": cfg.data.uri,
           "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "settings": {"resolution": ft.resolution, "lrs": list(sweep.lrs),
                        "steps": ft.steps, "warmup_steps": ft.warmup,
                        "batch_size": ft.batch_size, "seeds": sweep.seeds,
                        "protocol": sweep.protocol, "dropout": dropout},
           "choices": choices(cfg, dropout), "pretraining": pretrained_meta,
           "tasks": tasks, "summary": summary, "summary_std": spread,
           "trials": outcome["selection"] + final}
    if reference:
        ref = REFERENCE[reference]
        doc["reference"] = {"name": reference, "protocol": REFERENCE_PROTOCOL,
                            "same_protocol": sweep.protocol == "paper",
                            "summary": summarize({t: ref[t] for t in sweep.tasks})}
    return doc


def _fmt(v, std=None) -> str:
    if v is None:
        return "-"
    return f"{v:6.2f}" + (f" ± {std:4.2f}" if std is not None else "")


def table(doc: dict) -> str:
    """The terminal table."""
    ref = doc.get("reference")
    s = doc["settings"]
    out = [f"VTAB-1k: {doc['checkpoint']}",
           f"  {len(doc['tasks'])} task(s), {s['resolution']} px, {s['steps']} steps, batch "
           f"{s['batch_size']}, protocol {s['protocol']}, {s['seeds']} seed(s)"]
    if doc.get("official_splits") is False:
        out.append("  note: not the official VTAB-1k split sizes; not comparable with papers")
    if ref:
        out.append(f"  reference {ref['name']}: protocol {ref.get('protocol', '?')}")
        if not ref.get("same_protocol", True):
            out.append(f"  note: ours used protocol {s['protocol']}, not the reference's; the "
                       f"delta mixes model and protocol (use --protocol paper to compare)")
    head = f"{'task':<22}{'group':<13}{'lr':>8}{'val200':>9}  {'top-1 (test)':<16}"
    if ref:
        head += f"{ref['name']:>14}{'delta':>8}"
    out += ["", head, "-" * len(head)]
    for t in doc["tasks"]:
        v = t["val200"].get(f"{t['lr']:g}")
        line = (f"{t['task']:<22}{t['group']:<13}{t['lr']:>8g}{_fmt(v):>9}  "
                f"{_fmt(t['top1'], t['std']):<16}")
        if ref:
            r = t.get("reference")
            line += f"{_fmt(r):>14}{(t['top1'] - r if r is not None else 0):>+8.2f}"
        out.append(line)
    out.append("-" * len(head))
    counts = {g: sum(t["group"] == g for t in doc["tasks"]) for g in GROUPS}
    for key, label in SUMMARY_ROWS:
        if key not in doc["summary"]:
            continue
        if key in counts:
            label = f"{label} ({counts[key]})"
        v = doc["summary"][key]
        line = f"{label:<52}{_fmt(v, doc['summary_std'].get(key)):<16}"
        if ref and key in ref["summary"]:
            line += f"{_fmt(ref['summary'][key]):>14}{v - ref['summary'][key]:>+8.2f}"
        out.append(line)
    return "\n".join(out)


def to_csv(doc: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "group", "lr", "val200", "top1", "std", "seeds", "reference"])
    for t in doc["tasks"]:
        w.writerow([t["task"], t["group"], t["lr"], t["val200"].get(f"{t['lr']:g}", ""),
                    f"{t['top1']:.4f}", "" if t["std"] is None else f"{t['std']:.4f}",
                    " ".join(f"{x:.4f}" for x in t["seeds"]), t.get("reference", "")])
    ref = (doc.get("reference") or {}).get("summary", {})
    for key, _ in SUMMARY_ROWS:
        if key in doc["summary"]:
            std = doc["summary_std"].get(key)
            w.writerow([key, "", "", "", f"{doc['summary'][key]:.4f}",
                        "" if std is None else f"{std:.4f}", "", ref.get(key, "")])
    return buf.getvalue()


def chart(doc: dict, path: str | Path) -> None:
    """PNG: top-1 per task (bars coloured by group), reference marks, group means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"natural": "#4C72B0", "specialized": "#DD8452", "structured": "#55A868"}
    tasks = doc["tasks"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 0.35 * len(tasks) + 2.2),
                                  gridspec_kw={"width_ratios": [3, 1.3]})
    y = list(range(len(tasks)))[::-1]
    ax.barh(y, [t["top1"] for t in tasks], xerr=[t["std"] or 0 for t in tasks],
            color=[colours[t["group"]] for t in tasks])
    ref = doc.get("reference")
    if ref:
        ry = [yy for yy, t in zip(y, tasks, strict=True) if t.get("reference") is not None]
        ax.scatter([t["reference"] for t in tasks if t.get("reference") is not None], ry,
                   marker="|", s=200, color="black", label=ref["name"], zorder=3)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, [t["task"] for t in tasks], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 on test (%)")
    ax.set_title(f"VTAB-1k: {Path(doc['checkpoint'].rstrip('/')).name}", fontsize=10)
    keys = [k for k, _ in SUMMARY_ROWS if k in doc["summary"]]
    labels = {"natural": "Natural", "specialized": "Specialized", "structured": "Structured",
              "mean": "Mean (tasks)", "mean_of_groups": "Mean (groups)"}
    xs = range(len(keys))
    ax2.bar(xs, [doc["summary"][k] for k in keys],
            color=[colours.get(k, "#8C8C8C") for k in keys])
    if ref:
        ax2.scatter([i for i, k in enumerate(keys) if k in ref["summary"]],
                    [ref["summary"][k] for k in keys if k in ref["summary"]],
                    marker="_", s=300, color="black", zorder=3)
    ax2.set_xticks(list(xs), [labels[k] for k in keys], rotation=35, ha="right", fontsize=8)
    ax2.set_ylim(0, 100)
    ax2.set_title("groups and means", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict, out_uri: str, local_dir: str | Path) -> dict[str, Path]:
    """Write vtab.{txt,csv,json,png} into `local_dir` and, when `out_uri` differs (S3 or
    another folder), copy them there; -> the local files."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    files = {"txt": local_dir / "vtab.txt", "csv": local_dir / "vtab.csv",
             "json": local_dir / "vtab.json", "png": local_dir / "vtab.png"}
    files["txt"].write_text(table(doc) + "\n")
    files["csv"].write_text(to_csv(doc))
    files["json"].write_text(json.dumps(doc, indent=2))
    chart(doc, files["png"])
    if storage.is_s3(out_uri) or Path(out_uri).resolve() != local_dir.resolve():
        for path in files.values():
            if storage.is_s3(out_uri):
                storage.upload_file(path, storage.join(out_uri, path.name))
            else:
                Path(out_uri).mkdir(parents=True, exist_ok=True)
                (Path(out_uri) / path.name).write_bytes(path.read_bytes())
    return files


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------
EXPERIMENT = "vtab"


def start_parent(tracking_uri: str, cfg, pretrained_meta: dict) -> str | None:
    """The parent run (created, or found again when the same command resumes), with the
    main settings as params (the names of earlier releases, which comparisons filter on) and
    the whole resolved config as the artifact config.json (`vit-vtab --config` reads it)."""
    from pipeline import tracking

    sweep, ft = cfg.sweep, cfg.finetune
    params = {"checkpoint": cfg.run.checkpoint, "data": cfg.data.uri,
              "tasks": ",".join(sweep.tasks), "resolution": ft.resolution,
              "lrs": ",".join(f"{lr:g}" for lr in sweep.lrs), "steps": ft.steps,
              "warmup_steps": ft.warmup, "batch_size": ft.batch_size, "seeds": sweep.seeds,
              "protocol": sweep.protocol, "gpus_per_trial": sweep.gpus_per_trial,
              "cpus_per_trial": sweep.cpus_per_trial}
    tags = {"checkpoint": cfg.run.checkpoint, "vit.kind": "vtab",
            "mlflow.note.content": f"VTAB-1k evaluation of {cfg.run.checkpoint}"}
    tags.update(tracking.pretrain_tags(pretrained_meta))
    try:
        run_id = tracking.start_run(tracking_uri, EXPERIMENT, cfg.run_name, params, tags,
                                    continuing=True, source="eval/vtab.py")
    except Exception as err:  # noqa: BLE001 - an outage must not stop the evaluation
        refused = tracking.refusal(err, tracking_uri)
        if refused:   # a refusal is a setting to fix, not an outage to wait out
            raise SweepError(refused) from None
        log.warning("MLflow unavailable (%s); evaluating without tracking",
                    tracking.redact(str(err).splitlines()[0][:160]) if str(err)
                    else type(err).__name__)
        return None
    try:
        tracking.client(tracking_uri).log_text(run_id, cfg.to_json(), "config.json")
    except Exception as err:  # noqa: BLE001 - the report files still come at the end
        log.warning("could not log config.json to MLflow run %s (%s)", run_id,
                    type(err).__name__)
    if pretrained_meta.get("mlflow_run_id"):
        from pipeline import registry

        try:
            registry.link_to_pretraining(tracking_uri, run_id, pretrained_meta["mlflow_run_id"],
                                         cfg.run.checkpoint, int(pretrained_meta["step"]))
        except Exception as err:  # noqa: BLE001 - the evaluation stands without the link
            log.warning("the checkpoint's pretraining run %s is not linked (%s); is it in "
                        "this MLflow store (%s)? Its results stay in the VTAB run only",
                        pretrained_meta["mlflow_run_id"],
                        tracking.redact(str(err).splitlines()[0][:160]) if str(err)
                        else type(err).__name__, tracking.redact(tracking_uri))
    return run_id


def log_results(tracking_uri: str, parent_id: str, doc: dict, files: dict[str, Path]) -> None:
    """Metrics on the parent, one nested run per task (pipeline.tracking), and the report
    files as the parent's artifacts."""
    from eval.data import task_uri
    from pipeline import tracking

    tracking.log_vtab_results(tracking_uri, parent_id, doc, {
        t["task"]: task_uri(doc["data"], BY_NAME[t["task"]]) for t in doc["tasks"]})
    tracking.log_artifacts(tracking_uri, parent_id, list(files.values()))
    tracking.finish_run(tracking_uri, parent_id, "FINISHED")
    meta = doc.get("pretraining") or {}
    if meta.get("mlflow_run_id"):
        from pipeline import registry

        try:
            registry.log_vtab_to_pretraining(
                tracking_uri, meta["mlflow_run_id"], doc["checkpoint"], int(meta["step"]),
                doc["summary"], {t["task"]: t["top1"] for t in doc["tasks"]},
                doc["settings"]["protocol"], parent_id)
        except Exception as err:  # noqa: BLE001 - the VTAB run holds the results anyway
            log.warning("could not log the results into pretraining run %s (%s)",
                        meta["mlflow_run_id"], tracking.redact(str(err).splitlines()[0][:160])
                        if str(err) else type(err).__name__)
