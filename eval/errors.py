"""The evaluation's own error: what a user must act on (a setting, a record, a failed trial),
said in one line. Below every evaluation module, since the validation (eval/trial.py), the
record of finished trials (eval/records.py), the protocol (eval/sweep.py), the driver
(eval/evaluate.py) and the MLflow report (eval/report.py) all raise it.
"""

from __future__ import annotations


class SweepError(RuntimeError):
    """The evaluation cannot start or finish, for a reason a user must act on (one line)."""
