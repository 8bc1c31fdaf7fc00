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
    return level


def clock(seconds: float) -> str:
    """3725 -> '1:02:05'; 65 -> '1:05'; days past 24 h ('2d 3:00:00')."""
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    text = f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
    return f"{days}d {h}:{m:02d}:{s:02d}" if days else text
