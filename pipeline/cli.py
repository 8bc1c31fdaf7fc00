"""What every command shares: the same names for the same things, the same exit codes, the
same logging switches, help texts that show their defaults.

    --checkpoint URI   the model a command reads (ours, Hugging Face, timm, the authors' .npz)
    --data URI         the images or shards it reads
    --out URI          where it writes (a folder or s3:// prefix; for pretraining and VTAB,
                       the storage its runs live in and resume from)
    --no-mlflow        write the files only, log nothing to MLflow
    --log-level LEVEL  ours, Ray's, Ray Data's, Tune's and MLflow's loggers alike

Exit codes: 0 done, 2 bad input or usage (nothing was started), 1 a failure at run time,
130 / 143 stopped by SIGINT / SIGTERM (`pipeline.interrupt`).

Old spellings keep working for one release with a one-line deprecation warning
(`deprecated`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

OK, FAILED, BAD_INPUT = 0, 1, 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Other libraries' loggers that --log-level governs with ours (in this process; what Ray's
# own processes log is set where Ray starts: `ray_logging_config`).
THIRD_PARTY = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3",
               "botocore", "filelock")
OURS = ("pipeline", "eval", "jobs", "infra")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows each option's default (where it has one that
    the help text does not already state)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or
                not action.option_strings or isinstance(default, list) and not default):
            return text
        return f"{text} (default: %(default)s)"


def parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first paragraph of `doc` (a module
    docstring) and whose epilog is the rest, as written."""
    head, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=textwrap.fill(" ".join(head.split()),
                                                                         88),
                                   epilog=rest, formatter_class=HelpFormatter)


def add_common(ap: argparse.ArgumentParser, mlflow: bool = True) -> None:
    """--log-level, and --no-mlflow for a command that logs to MLflow."""
    ap.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, metavar="LEVEL",
                    help=f"{', '.join(LOG_LEVELS)}: how much ours, Ray, Ray Data, Tune and "
                         f"MLflow log (default: $VIT_LOG_LEVEL, else INFO)")
    if mlflow:
        ap.add_argument("--no-mlflow", action="store_true",
                        help="write the files only; log nothing to MLflow (default: log to "
                             "MLFLOW_TRACKING_URI, else the local store under ~/vit-runs)")


def deprecated(ap: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Accept the old spelling `old` of the option `new` (same dest), with a one-line
    warning on stderr each time it is used."""

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated and goes in the next release; use {new}",
                  file=sys.stderr)
            setattr(namespace, self.dest, True if self.nargs == 0 else values)

    dest = new.lstrip("-").replace("-", "_")
    ap.add_argument(old, dest=dest, action=Deprecated, help=argparse.SUPPRESS, **kwargs)


def positional_deprecated(args: argparse.Namespace, pairs: dict[str, str]) -> None:
    """Old positional arguments kept for one release: `pairs` maps the namespace name of
    the positional to the new option's dest. The option wins; the positional warns."""
    for old, new in pairs.items():
        value = getattr(args, old, None)
        if value is None:
            continue
        flag = f"--{new.replace('_', '-')}"
        print(f"warning: giving {new.upper()} without {flag} is deprecated and goes in the "
              f"next release; write {flag} {value}", file=sys.stderr)
        if getattr(args, new, None) is None:
            setattr(args, new, value)


def require(ap: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Options that are required but may also come from an old positional spelling."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")


def configure_logging(level: str | None = None) -> str:
    """Log format and level for a command: `level` (--log-level), else VIT_LOG_LEVEL, else
    INFO, for our loggers and the libraries' (Ray, Ray Data, Tune, MLflow) alike; at INFO the
    libraries say WARNING and above, since their INFO lines are about their own machinery.
    The training workers take our level from the driver. -> the level."""
    level = (level or os.environ.get("VIT_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        level = "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OURS:
        logging.getLogger(name).setLevel(level)
    theirs = "WARNING" if level == "INFO" else level
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(theirs)
    # Libraries imported later (MLflow sets its level at import) and the Ray processes a local
    # Ray starts inherit these; a cluster's processes get them through `ray_env_vars`. A
    # value the user set wins.
    for var in LIBRARY_LEVEL_VARS:
        os.environ.setdefault(var, theirs)
    # MLflow prints a "View run at <url>" pair at each run's end; our commands say where
    # their runs are themselves.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return level


# Environment variables that set a library's log level in every process that imports it:
# Ray Data's logger (its console handler would print each dataset's plan and progress),
# MLflow's (system-metrics start and stop lines from every training worker), and ours for
# the other libraries in Ray's worker processes (`ray_worker_setup`: Ray's worker logging
# puts the root logger at INFO, and botocore said "Found credentials in environment
# variables." twice per S3 call of each worker).
LIBRARY_LEVEL_VARS = ("RAY_DATA_LOG_LEVEL", "MLFLOW_LOGGING_LEVEL", "VIT_LIBRARY_LOG_LEVEL")


class _DropChoices(logging.Filter):
    """Ray Data's warning that its progress bars are off: we turned them off on purpose
    (not on a terminal), so each dataset need not say so."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


# Ray Train's controller asks the autoscaling coordinator for the workers' resources and
# gives it 5 s; on a loaded machine the coordinator actor is not up by then, and Ray logs a
# warning it calls "safe to ignore" with a 20-line traceback.
_TRANSIENT = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


class _WithoutTraceback(logging.Filter):
    """A warning Ray calls transient, as one line: its exception's type and first line
    instead of the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            first = (str(err).strip().splitlines() or [""])[0]
            record.msg = f"{record.getMessage()} ({type(err).__name__}: {first})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def ray_worker_setup() -> None:
    """Runs first in every Ray worker process of our jobs (the runtime environment's
    `worker_process_setup_hook`): the other libraries log at the command's level for them
    (`configure_logging`), Ray Data's "progress bars disabled" warning, a choice of ours, is
    dropped, Ray Train's transient "failed to send resource request" is one line, and a
    SIGTERM that lands in a callback exits quietly (`exit_on_unraisable_exit`)."""
    theirs = os.environ.get("VIT_LIBRARY_LOG_LEVEL", "WARNING").upper()
    if theirs in LOG_LEVELS:
        for name in THIRD_PARTY:
            if not name.startswith("ray"):           # Ray's own: its worker logging config
                logging.getLogger(name).setLevel(theirs)
    logging.getLogger("ray.data._internal.progress").addFilter(_DropChoices())
    logging.getLogger(_TRANSIENT).addFilter(_WithoutTraceback())
    sys.unraisablehook = exit_on_unraisable_exit(sys.unraisablehook)


def exit_on_unraisable_exit(default):
    """`sys.unraisablehook` for Ray's workers: Ray's SIGTERM handler (which Tune's and Train's
    shutdown sends) raises SystemExit wherever the worker is; inside a garbage-collector or
    weakref callback Python cannot raise it, so it printed "Exception ignored in: <function
    WeakSet...>" and a 10-line traceback into the command's output, and the worker went on.
    This exits as Ray meant, without them; anything else goes to `default`."""
    def hook(unraisable):
        exc = unraisable.exc_value
        if not isinstance(exc, SystemExit):
            return default(unraisable)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(exc.code if isinstance(exc.code, int) else 1)

    return hook


# Linux's limit on an AF_UNIX socket path, and the longest paths a local Ray makes under its
# temp folders: Ray's own sockets (<RAY_TMPDIR or TMPDIR>/ray/session_<date>_<time>_<us>_<the
# driver's pid>/sockets/plasma_store) and, in its dashboard, Python multiprocessing's
# (<TMPDIR>/pymp-xxxxxxxx/listener-xxxxxxxx).
SOCKET_PATH_MAX = 107
MP_SOCKET_SUFFIX = len("/pymp-xxxxxxxx/listener-xxxxxxxx")


def ray_socket_suffix() -> int:
    return len(f"/ray/session_2026-12-06_01-43-06_547133_{os.getpid()}/sockets/plasma_store")


def temp_dir_problem(address: str | None) -> str | None:
    """Why a new local Ray (no `address`, no RAY_ADDRESS) cannot start under this process's
    temp folders, with the fix: its sockets' paths would be too long (Ray refuses to start,
    or its dashboard waits a minute for a socket it cannot make). None when they fit, or
    when the command joins a cluster. Linux only."""
    import tempfile

    if address or os.environ.get("RAY_ADDRESS") or not sys.platform.startswith("linux"):
        return None
    tmp = os.environ.get("TMPDIR") or tempfile.gettempdir()
    ray_name = "RAY_TMPDIR" if os.environ.get("RAY_TMPDIR") else "TMPDIR"
    checks = ((ray_name, os.environ.get("RAY_TMPDIR") or tmp, ray_socket_suffix()),
              ("TMPDIR", tmp, MP_SOCKET_SUFFIX))
    for name, folder, suffix in checks:
        room, size = SOCKET_PATH_MAX - suffix, len(folder.encode())
        if size > room:
            return (f"{name}={folder} is {size} bytes, too long for the socket paths of a "
                    f"local Ray (at most {room}: AF_UNIX paths end at {SOCKET_PATH_MAX}); "
                    f"point {name} at a short folder (export {name}=/tmp) or give --address "
                    f"of a running cluster")
    return None


def ray_init_args(address: str | None, **env_vars: str) -> dict:
    """`address` and `runtime_env` for `ray.init` (`interrupt.ray_init`) in our commands:
    - the worker set-up hook (`ray_worker_setup`);
    - on a running cluster (`address`), whose processes do not inherit this one's
      environment, the library log levels (`ray_env_vars`);
    - RAY_ADDRESS naming the cluster in its processes: Ray Train's
      placement-group cleaner finds the cluster's state API from the environment, and with a
      second Ray on the machine (two runs on one workstation, a test suite) it found two and
      printed a 30-line traceback. A new local Ray's head takes a port picked here
      (RAY_GCS_SERVER_PORT), so its address is known before it starts;
    - `env_vars`."""
    import socket

    hook = {"worker_process_setup_hook": "pipeline.cli.ray_worker_setup"}
    if address:
        named = {}
        try:            # host:port or "auto" -> the GCS address (not a ray:// client address)
            from ray._private.services import canonicalize_bootstrap_address

            if "://" not in address and "RAY_ADDRESS" not in _job_env_vars():
                named = {"RAY_ADDRESS": canonicalize_bootstrap_address(address)}
        except Exception:  # noqa: BLE001 - only the traceback above depends on it
            named = {}
        return {"address": address, "runtime_env": {
            **hook, "env_vars": {**ray_env_vars(), **named, **env_vars}}}
    from ray.util import get_node_ip_address

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)     # read by the head ray.init starts
    # A local Ray is one machine that nothing drains: Ray Train's preemption watcher (an
    # actor per run, which also logs a core_worker error about its own restarts) has nothing
    # to watch there. A value the user set wins; clusters keep Ray's default (on).
    local = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER":
             os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}
    return {"address": "local", "runtime_env": {**hook, "env_vars": {
        "RAY_ADDRESS": f"{get_node_ip_address()}:{port}", **local, **env_vars}}}


def ray_env_vars() -> dict[str, str]:
    """The library log levels for a Ray runtime environment (`ray.init(runtime_env=...)` on
    a running cluster, whose processes do not inherit this one's environment), without the
    variables the job's own runtime environment sets: Ray refuses to merge a variable that
    both set, and the job's choice wins anyway."""
    theirs = _job_env_vars()
    return {v: os.environ[v] for v in LIBRARY_LEVEL_VARS if v in os.environ and v not in theirs}


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime environment `ray job submit` gave this driver ({} when
    not a submitted job)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def clock(seconds: float) -> str:
    """3725 -> '1:02:05'; 65 -> '1:05'; days past 24 h ('2d 3:00:00')."""
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    text = f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
    return f"{days}d {h}:{m:02d}:{s:02d}" if days else text
