"""How Ray Tune runs for the sweep (eval/sweep.py), on the driver around `tuner.fit()`: the
AWS credentials kept out of the trials' runtime env, Tune's own terminal output kept off the
user's terminal, and our one line per finished, retried or failed trial with a heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("eval.vtab")


@contextlib.contextmanager
def no_credentials_in_trial_env():
    """Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the session tokens from the
    driver's environment into every trial actor's runtime env (ray/tune/execution/
    class_cache.py, ENV_VARS_TO_PROPAGATE), and Ray's runtime_env_agent.log then prints them
    in plain text on every node. Trials need none of the driver's: they read data and weights
    from the object store, and whatever a node's processes write to storage resolves its
    credentials through the standard AWS chain of that node's own environment."""
    from ray.tune.execution import class_cache

    saved = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in saved if not v.startswith("AWS_")}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = saved


@contextlib.contextmanager
def quiet_tune():
    """Tune's own terminal output (the boxed experiment tables, the TensorBoard hint, the
    "wrote the experiment state" lines, a traceback per failed attempt of a trial, also one
    that is retried) says nothing our one line per finished, retried or failed trial and the
    heartbeat do not; keep it off the user's terminal. Tune reads the variables per call."""
    quiet = {"RAY_AIR_NEW_OUTPUT": "0",            # the legacy reporter: silent at verbose=0
             "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}   # read when tuner.fit() starts
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def progress_callback(phase: str, total: int):
    """A Tune callback (Tune is imported here, not when the CLI parses its arguments)."""
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished trial and a heartbeat a minute: readable for 95 trials."""

        def __init__(self, phase: str, total: int, every_s: float = 60.0):
            self.phase, self.total, self.every_s = phase, total, every_s
            self.done, self.last = 0, time.monotonic()
            self.started = time.monotonic()

        def pace(self) -> str:
            """Elapsed time and, at this phase's mean pace, the time left."""
            from pipeline.cli import clock

            elapsed = time.monotonic() - self.started
            left = (self.total - self.done) * elapsed / self.done if self.done else None
            return f"{clock(elapsed)} elapsed" + (f", ~{clock(left)} left"
                                                  if left is not None else "")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            c, m = trial.config["trial"], trial.last_result or {}
            what = "val200" if self.phase == "select" else "test"
            score = (f"{what} top-1 {m['top1']:.2f}" if not m.get("diverged")
                     else "diverged")
            log.info("%s [%d/%d] %s lr %g seed %d: %s (%.0f s) | %s", self.phase,
                     self.done, self.total, c["task"], c["lr"], c["seed"], score,
                     m.get("time_total_s", 0.0), self.pace())

        def on_trial_recover(self, iteration, trials, trial, **info):
            # Its actor failed (the node was lost, say) and Tune runs it again from the start.
            c = trial.config["trial"]
            log.warning("%s: trial %s lr %g seed %d failed (%s); running it again (retry %d "
                        "of %d)", self.phase, c["task"], c["lr"], c["seed"],
                        _last_error(trial), trial.num_failures, trial.max_failures)

        def on_trial_error(self, iteration, trials, trial, **info):
            c = trial.config["trial"]
            log.warning("%s: trial %s lr %g seed %d failed (error file: %s)", self.phase,
                        c["task"], c["lr"], c["seed"], trial.error_file)

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last < self.every_s:
                return
            self.last = time.monotonic()
            states = [t.status for t in trials]
            log.info("%s: %d/%d done, %d running, %d pending | %s", self.phase,
                     states.count("TERMINATED") + states.count("ERROR"), len(states),
                     states.count("RUNNING"), states.count("PENDING"), self.pace())

    return Progress(phase, total)


def _last_error(trial) -> str:
    """The last line of a trial's error file (Tune appends each failure's message there)."""
    try:
        lines = Path(trial.error_file).read_text().strip().splitlines()
    except (OSError, TypeError):
        return "no error file"
    if not lines:
        return "no message"
    return lines[-1] if len(lines[-1]) <= 200 else lines[-1][:197] + "..."
