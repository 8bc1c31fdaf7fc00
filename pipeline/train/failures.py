"""Which failures of a training run are worth a retry.

Ray Train retries a worker group after any worker error, up to `FailureConfig.max_failures`
(`DefaultFailurePolicy`). That budget is for transient faults: a lost node, a network error,
a preempted instance. A failure that would recur on every retry (bad data, a manifest that
disagrees with its shard, a corrupt checkpoint, a full disk, a bad config, a non-finite loss)
must not spend it: retried, it costs minutes of restarts, megabytes of logs and the same metric
steps logged again, then ends with the same error.

Workers raise `Fatal` (or an error `is_fatal` recognises) with one line for the user; the
policy here makes Ray Train stop at once instead of retrying; the driver turns it back into
that line (`fatal_message`). Any rank may raise it: Ray Train then stops the whole worker
group, so no other rank is left waiting in a collective.
"""

from __future__ import annotations

import errno

# Local-filesystem errors that a retry cannot fix (ENOSPC: disk full; EDQUOT: quota; EROFS:
# read-only; EACCES/EPERM: permissions).
FATAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class Fatal(RuntimeError):
    """A training failure that a retry would repeat; its message is the one line the user
    sees."""


def is_fatal(err: BaseException) -> bool:
    from pipeline.train.step import NonFiniteLoss
    from pipeline.weights import CheckpointError

    if isinstance(err, (Fatal, CheckpointError, NonFiniteLoss)):
        return True
    return isinstance(err, OSError) and err.errno in FATAL_ERRNOS


def describe(err: BaseException) -> str:
    """The one line a fatal error shows."""
    if isinstance(err, OSError) and err.errno in FATAL_ERRNOS:
        where = f" ({err.filename})" if err.filename else ""
        fix = {errno.ENOSPC: "free space or point --out / TMPDIR elsewhere",
               errno.EDQUOT: "free space under the quota or point --out elsewhere",
               errno.EROFS: "point --out at a writable place"}.get(
            err.errno, "fix the permissions or point --out elsewhere")
        return f"{err.strerror or err}{where}; {fix}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def worker_errors(err: BaseException) -> list[BaseException]:
    """The exceptions the workers raised, from Ray Train's WorkerGroupError."""
    failures = getattr(err, "worker_failures", None) or {}
    return [getattr(e, "_base_exc", e) for _, e in sorted(failures.items())]


def fatal_message(err: BaseException) -> str | None:
    """The user's line if `err` (what `TorchTrainer.fit` raised) comes from a fatal worker
    error, else None."""
    for e in worker_errors(err):
        if is_fatal(e):
            return describe(e)
    return None


def failure_policy(failure_config):
    """Ray Train's default policy, except that fatal worker errors are raised at once."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2.api.exceptions import WorkerGroupError

    class Policy(DefaultFailurePolicy):
        def _is_retryable_error(self, training_failed_error) -> bool:
            if isinstance(training_failed_error, WorkerGroupError) and any(
                    is_fatal(e) for e in worker_errors(training_failed_error)):
                return False
            return super()._is_retryable_error(training_failed_error)

    return Policy(failure_config)


# Set by a command that started its own local Ray (`own_local_ray`).
_OWN_LOCAL_RAY = False


def own_local_ray(own: bool = True) -> None:
    """Say that this process started the Ray it runs on, and that Ray ends with it."""
    global _OWN_LOCAL_RAY
    _OWN_LOCAL_RAY = own


def trainer_class():
    """TorchTrainer (`backend.trainer_base`: Ray's, without torch in this process or the
    controller) with `failure_policy` (Ray 2.60 has no public hook for a policy: the
    trainer builds its default one and hands it to the controller in
    `_initialize_and_run_controller`, which is where it is replaced), and with
    `request_abort()` in place of Ray Train's SIGINT handler (which aborts, then
    `sys.exit(0)`s on a later Ctrl-C, and ignores SIGTERM): the command's own handler
    (pipeline.interrupt) calls it for SIGINT and SIGTERM alike."""
    from pipeline.train.backend import trainer_base

    class Trainer(trainer_base()):
        _controller = None

        def _initialize_and_run_controller(self, **kwargs):
            kwargs["failure_policy"] = failure_policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

        _abort_requested = False

        def _register_sigint_handler(self, controller):
            self._controller = controller
            if self._abort_requested:          # the signal came while it was being created
                self.request_abort()

        def request_abort(self) -> None:
            """Ask the controller to stop its worker group and exit (workers are killed: a
            checkpoint upload in flight is left incomplete, which `checkpoints.latest`
            ignores); `fit()` then returns or raises. Safe in a signal handler: it does not
            wait."""
            self._abort_requested = True
            if self._controller is not None:
                self._controller.abort.remote()

        def _create_default_callbacks(self):
            """Ray Train's datasets callback as `run.streams_callback` (no `DatasetManager`
            actor for a stream per worker). Without Ray Train's placement-group cleaner on
            a local Ray this command started: the cleaner (a detached actor per run)
            removes the worker group's placement group if the controller dies while the
            job lives on, but such a Ray goes with the command. There it only cost a
            process, a state-API query a second, and at the end up to 12 s waiting for its
            query under load ("Failed to stop PlacementGroupCleaner gracefully", with a
            traceback, in the log)."""
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import (
                PlacementGroupCleanerCallback,
            )

            from pipeline.train.run import streams_callback

            callbacks = []
            for c in super()._create_default_callbacks():
                if isinstance(c, DatasetsCallback):
                    c = streams_callback(self.train_run_context, self.datasets)
                elif isinstance(c, PlacementGroupCleanerCallback) and _OWN_LOCAL_RAY:
                    continue
                callbacks.append(c)
            return callbacks

    return Trainer
