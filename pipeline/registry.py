"""Where pretraining runs and their VTAB-1k results meet in MLflow: the model registry, the
VTAB summary written back into the pretraining run, and the VTAB run's link to it.

The registry: one registered model per experiment (or per `run.registered_model`), one version
per registered checkpoint. A version's source is an MLflow 3 logged model holding a small
pointer (checkpoint.json: the checkpoint's URI, step and run), never the weights: a tracking
server refuses a local path as a source unless it lies inside the run's artifacts
(mlflow/server/handlers.py, `_validate_source_run`), and copying multi-GB checkpoints into the
artifact store only to register them would double the storage. `models:/<model id>` is
accepted for local, s3:// and served-artifact stores alike; where the weights are is the
version's `checkpoint` tag. Aliases: `newest` (the final checkpoint of the pretraining run
that finished last; `latest` is MLflow's own, reserved: the highest version number) and
`best-vtab` (the best VTAB-1k mean among comparable results).

Results flow back: `log_vtab_to_pretraining` logs an evaluation's summary into the pretraining
run at the checkpoint's step (a VTAB-over-step chart beside the loss), tags the checkpoint's
version with it and moves `best-vtab`. It needs only MLflow and plain values, so whatever
evaluates a checkpoint (`vit-vtab`, or pretraining itself) can call it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

NEWEST = "newest"
BEST_VTAB = "best-vtab"
POINTER = "checkpoint.json"
PRETRAIN_PREFIX = "pretrain."     # the pretraining config's params on a VTAB run


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def registered_model_name(experiment: str, name: str = "") -> str:
    """`name` (run.registered_model) when set, else the experiment's name; '/' and ':',
    which MLflow refuses in model names, become '-'."""
    return re.sub(r"[/:]", "-", name or experiment).strip() or "vit"


def model_name_of(client, run) -> str:
    """The registered model a pretraining run's checkpoints go to: what its end recorded
    (tag `registered_model`, "<name>/<version>"), else what its config and experiment say."""
    recorded = run.data.tags.get("registered_model", "")
    if recorded:
        return recorded.rsplit("/", 1)[0]
    return registered_model_name(client.get_experiment(run.info.experiment_id).name,
                                 run.data.params.get("run.registered_model", ""))


_GLOBAL_URI = threading.Lock()
_URI_VAR = "MLFLOW_TRACKING_URI"


@contextlib.contextmanager
def _use_tracking_uri(uri: str):
    """MLflow's global tracking URI set to `uri` for a block, then put back as it was, with
    MLFLOW_TRACKING_URI: MLflow's own setter also sets that variable, and unsets it when the
    URI goes back to "not set" (its `_use_tracking_uri` did that, and the command's later
    evaluations then logged to the default store). One block at a time: it is global."""
    from mlflow.tracking._tracking_service import utils

    with _GLOBAL_URI:
        env, saved = os.environ.get(_URI_VAR), utils._tracking_uri
        utils.set_tracking_uri(uri)
        try:
            yield
        finally:
            utils.set_tracking_uri(saved)
            if env is None:
                os.environ.pop(_URI_VAR, None)
            else:
                os.environ[_URI_VAR] = env


def checkpoint_version(client, model_name: str, run_id: str, step: int):
    """The version of `model_name` registered for run `run_id`'s checkpoint of `step`, or
    None. (By step, not by URI: one checkpoint reads as /tmp/x or /private/tmp/x.)"""
    for v in client.search_model_versions(f"run_id = '{run_id}'"):
        if v.name == model_name and v.tags.get("step") == str(step):
            return v
    return None


def model_id_of(version) -> str:
    """The logged model behind a version (its source, `models:/<model id>`)."""
    return version.source.split("models:/", 1)[-1]


def register_checkpoint(tracking_uri: str, run_id: str, model_name: str,
                        checkpoint_uri: str, step: int, newest: bool = False):
    """The version of registered model `model_name` (created on first use) for a checkpoint
    of pretraining run `run_id`: found again if registered before, else a logged model
    holding the pointer, the run's output at `step`, and a version of it. `newest`: move the
    alias `newest` to it (the end of a pretraining run). -> the ModelVersion."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    version = checkpoint_version(client, model_name, run_id, step)
    if version is None:
        run = client.get_run(run_id)
        run_name = run.data.tags.get("vit.run_name") or run.info.run_name
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            try:
                client.create_registered_model(model_name, description=(
                    "ViT checkpoints of pretraining runs, one version per checkpoint. A "
                    "version's `checkpoint` tag is where the weights are (pipeline.weights "
                    "format: `load_vit(uri)`, or `vit-vtab --checkpoint uri`); its vtab.* tags "
                    "hold the last VTAB-1k result. Aliases: newest (the final checkpoint of "
                    "the pretraining run that finished last), best-vtab (the best VTAB-1k "
                    "mean)."))
            except MlflowException as err:   # a run finishing at the same time made it
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        tags = {"checkpoint": checkpoint_uri, "step": str(step), "pretrain_run_name": run_name}
        model = client.create_logged_model(run.info.experiment_id,
                                           name=f"{run_name}-step{step}", source_run_id=run_id,
                                           tags=tags, model_type="vit-checkpoint")
        with tempfile.TemporaryDirectory(prefix="vit-pointer-") as folder:
            Path(folder, POINTER).write_text(json.dumps({
                **tags, "step": step, "pretrain_run_id": run_id,
                "load": "pipeline.weights.load_vit(checkpoint)"}, indent=1))
            client.log_model_artifacts(model.model_id, folder)
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        # A SQL or file store (no server) looks the `models:/` source up through the
        # process's global tracking URI, not this client's (MLflow's TODO in
        # store/model_registry/sqlalchemy_store.py): where that differs, the version failed
        # and MLflow's default store (./mlflow.db) appeared in the working directory.
        with _use_tracking_uri(tracking_uri):
            version = client.create_model_version(
                model_name, source=f"models:/{model.model_id}", run_id=run_id,
                model_id=model.model_id, tags=tags, await_creation_for=0,
                description=f"{run_name} at step {step}: {checkpoint_uri}")
    if newest:
        client.set_registered_model_alias(model_name, NEWEST, version.version)
    return version


# ---------------------------------------------------------------------------------------------
# VTAB-1k results and the pretraining run
# ---------------------------------------------------------------------------------------------
def run_link(run) -> str:
    """A Markdown link to `run` in the MLflow UI (relative: it works under any host and
    prefix the UI is served at), for run descriptions."""
    name = run.data.tags.get("vit.run_name") or run.info.run_name or run.info.run_id
    return f"[{name}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"


def link_to_pretraining(tracking_uri: str, vtab_run_id: str, pretrain_run_id: str,
                        checkpoint_uri: str, step: int) -> None:
    """At the start of an evaluation: the VTAB run gets the pretraining run's params as
    `pretrain.<key>` (so VTAB runs slice by any pretraining setting), the checkpoint's
    version as its model input (MLflow links model, version and source run), the pretraining
    run's experiment as a tag, and a description linking to it. Raises when the pretraining
    run is not in this store."""
    from mlflow.entities import LoggedModelInput, Param

    from pipeline.tracking import SECRET_WORDS

    client = _client(tracking_uri)
    pre = client.get_run(pretrain_run_id)
    version = register_checkpoint(tracking_uri, pretrain_run_id, model_name_of(client, pre),
                                  checkpoint_uri, step)
    client.log_inputs(vtab_run_id, models=[LoggedModelInput(model_id_of(version))])
    have = client.get_run(vtab_run_id).data.params
    params = [Param(f"{PRETRAIN_PREFIX}{k}", v) for k, v in sorted(pre.data.params.items())
              if f"{PRETRAIN_PREFIX}{k}" not in have
              and not any(w in k.upper() for w in SECRET_WORDS)]
    params += [Param("pretrain.step", str(step))] if "pretrain.step" not in have else []
    for i in range(0, len(params), 100):
        client.log_batch(vtab_run_id, params=params[i:i + 100])
    for key, value in {
            "pretrain_experiment_id": pre.info.experiment_id,
            "registered_model": f"{version.name}/{version.version}",
            "mlflow.note.content": (
                f"VTAB-1k evaluation of {checkpoint_uri}: step {step} of pretraining run "
                f"{run_link(pre)}, registered as {version.name} version {version.version}. "
                f"Its summary is logged into the pretraining run at step {step}.")}.items():
        client.set_tag(vtab_run_id, key, value)


def log_vtab_to_pretraining(tracking_uri: str, pretrain_run_id: str, checkpoint_uri: str,
                            step: int, summary: dict[str, float], tasks: dict[str, float],
                            protocol: str, vtab_run_id: str | None = None) -> bool:
    """An evaluation's result, back where the checkpoint came from: `vtab/<group>`,
    `vtab/mean`, `vtab/mean_of_groups` and `vtab/<task>/top1` (the VTAB run's keys) logged
    into pretraining run `pretrain_run_id` at `step`, linked to the checkpoint's logged
    model; the checkpoint's version (registered now if it was not) tagged with the mean,
    the mean of group means, the protocol, the tasks and the VTAB run; and the alias
    `best-vtab` moved to it when it beats the holder (`_better`). -> whether it moved."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    pre = client.get_run(pretrain_run_id)
    name = model_name_of(client, pre)
    version = register_checkpoint(tracking_uri, pretrain_run_id, name, checkpoint_uri, step)
    ts, model_id = int(time.time() * 1000), model_id_of(version)
    values = {f"vtab/{k}": v for k, v in summary.items()}
    values |= {f"vtab/{t}/top1": v for t, v in tasks.items()}
    client.log_batch(pretrain_run_id, metrics=[Metric(k, float(v), ts, step, model_id=model_id)
                                               for k, v in values.items()])
    result = {"vtab.mean": f"{summary['mean']:.4f}", "vtab.protocol": protocol,
              "vtab.tasks": ",".join(tasks)}
    if "mean_of_groups" in summary:
        result["vtab.mean_of_groups"] = f"{summary['mean_of_groups']:.4f}"
    if vtab_run_id:
        result["vtab.run_id"] = vtab_run_id
    for key, value in result.items():
        client.set_model_version_tag(name, version.version, key, value)
    try:
        holder = client.get_model_version_by_alias(name, BEST_VTAB)
    except MlflowException:
        holder = None
    if holder is None or holder.version == version.version or _better(result, holder.tags):
        client.set_registered_model_alias(name, BEST_VTAB, version.version)
        return True
    log.info("%s stays on %s version %s (%s); this result (%s) does not beat it", BEST_VTAB,
             name, holder.version, _describe(holder.tags), _describe(result))
    return False


def _better(new: dict[str, str], held: dict[str, str]) -> bool:
    """Whether a result should take `best-vtab` from the holder's: a higher mean under the
    same protocol over the same tasks, or any result over more tasks than the holder's (a
    smoke evaluation of 3 tasks never keeps it from a full one). Means of other protocols or
    task sets are not compared."""
    mine, theirs = set(new["vtab.tasks"].split(",")), set(held.get("vtab.tasks", "").split(","))
    if theirs < mine:
        return True
    if mine != theirs or new["vtab.protocol"] != held.get("vtab.protocol"):
        return False
    return float(new["vtab.mean"]) > float(held.get("vtab.mean", "-1"))


def _describe(tags: dict[str, str]) -> str:
    tasks = len([t for t in tags.get("vtab.tasks", "").split(",") if t])
    return f"mean {tags.get('vtab.mean', '?')}, protocol {tags.get('vtab.protocol', '?')}, " \
           f"{tasks} task(s)"
