"""What the driver hands every Ray Train worker, without torch: the command's driver and Ray
Train's controller, which unpickle these (and the train function, by name), never load it.

- `WorkerSpec`: the run, once (pickled into the TorchTrainer's `train_loop_config`).
- `GroupStart`: where one worker-group start begins, sent with the stream (`attach_start`).
- `train_fn`: the workers' function (`pipeline.train.loop.train_loop`, imported there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.train import checkpoints
from pipeline.train.config import PretrainConfig
from pipeline.train.failures import Fatal


def train_fn(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: `pipeline.train.loop.train_loop`, imported on the
    worker (a function is pickled by its module's name, and the controller unpickles it)."""
    from pipeline.train.loop import train_loop

    train_loop(config)


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every worker (pickled once into the TorchTrainer)."""

    cfg: PretrainConfig
    run_uri: str                        # this run's checkpoints: <storage>/<run name>
    resume: str | None = None
    init: str | None = None
    run_id: str | None = None           # MLflow run, created by the driver
    tracking_uri: str = ""
    stream: Any = None                  # pipeline.data.plan.StreamPlan, or None (no position)
    health: Any = None                  # DataHealth actor: skipped samples
    probe: Any = None                   # ObjectRef of the FewShotProbe (None: off)
    log_level: str = "INFO"             # the driver's (--log-level), for the workers' logs


@dataclass(frozen=True)
class GroupStart:
    """The resume point of a worker-group start (`checkpoints.resume_point`) and the data
    position the group's stream was built from (None: a stream whose position is not
    tracked). The dataset factory (`run.TrainData`, in Ray Train's controller) computes it
    once per start, after a failure too, so that it names the newest checkpoint, and sends it
    with the stream: every worker restores the checkpoint whose position the stream begins
    at, and none reads the storage to find it again."""

    point: checkpoints.ResumePoint
    position: Any = None


# A Ray Data context travels with its dataset: each worker's share of the stream carries a copy
# (`stream.per_worker`, or Ray Train's split coordinator), and hands it back
# (`DataIterator.get_context`).
START_KEY = "vit.group_start"


def attach_start(ds, start: GroupStart):
    """`ds` with `start` in its context (what `group_start` reads on the workers)."""
    ds.context.set_config(START_KEY, start)
    return ds


def group_start(shard) -> GroupStart:
    start = shard.get_context().get_config(START_KEY)
    if not isinstance(start, GroupStart):
        # Without it a worker cannot know which checkpoint its stream continues from; guessing
        # (reading the storage again) could pair the model of one step with the data of another.
        raise Fatal("the training stream came without its start point (run.TrainData attaches "
                    "it to the dataset's context): this Ray version does not carry a dataset's "
                    "context to the workers")
    return start
