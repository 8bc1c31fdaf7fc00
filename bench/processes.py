"""CPU seconds by process of a command (a run and every process of the Ray it starts), here
and at a baseline commit, alternating, side by side: which Ray actors, tasks and daemons a
change adds or removes, and what the run costs the machine in all.

The command runs from this checkout and from a worktree of the baseline (PYTHONPATH set to
each, so the command, Ray's workers and the runtime environment import that tree's code). A
sampler reads every process's utime + stime from /proc every 0.2 s while it runs (Linux
only; a process that lives less than that is missed, and its last 0.2 s too) and names it by
its command line (Ray's actors by class, whatever method they run: `ray::SplitCoordinator`;
a pooled worker by the first task or actor it ran).

`{tmp}` in the command is a new empty folder for each run (a run given the same --out and
--name twice would continue the first, finished, run):

    python bench/processes.py --baseline HEAD~1 --runs 3 -- \\
        python jobs/pretrain.py --preset smoke --out {tmp}
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict:
    """pid -> (name, cpu seconds, start time) of every process now."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(pid)] = (name_of(cmd), (int(fields[11]) + int(fields[12])) / TICK, fields[19])
    return out


def name_of(cmd: str) -> str:
    """A short name: Ray's actor or task name, else the program and its first argument."""
    if cmd.startswith("ray::"):        # an actor by its class, whichever method it runs now
        return cmd.split()[0].split(".")[0]
    words = [w for w in cmd.split() if not w.startswith("-")]
    if not words:
        return ""
    prog = [os.path.basename(w) for w in words[:2]]
    return " ".join(re.sub(r"python3?(\.\d+)?$", "python", p) for p in prog)


def measure(argv: list[str], cwd: Path) -> tuple[float, dict]:
    """Run `argv` in `cwd` -> (wall seconds, {process name: cpu seconds})."""
    tmp = tempfile.mkdtemp(prefix="bench-run-")
    try:
        return _measure([a.replace("{tmp}", tmp) for a in argv], cwd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(argv: list[str], cwd: Path) -> tuple[float, dict]:
    before = snapshot()
    env = {**os.environ, "PYTHONPATH": str(cwd), "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last: dict = {}
    while proc.poll() is None:
        for pid, (name, cpu, start) in snapshot().items():
            # A Ray worker is named by what it runs (setup_worker.py under a runtime
            # environment, ray::IDLE, then an actor's class, then the task it runs last):
            # keep its first Ray name that is not idle.
            seen = last.get((pid, start), ("",))[0]
            keep = seen if (seen.startswith("ray::") and seen != "ray::IDLE") or not name \
                else name
            last[(pid, start)] = (keep or "?", cpu)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: {' '.join(argv)} exited with {proc.returncode} in {cwd}")
    used: dict = collections.Counter()
    for (pid, start), (name, cpu) in last.items():
        old = before.get(pid)
        cpu -= old[1] if old and old[2] == start else 0.0
        if cpu > 0.02 and pid != os.getpid():
            used[name] += cpu
    return wall, used


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="HEAD", help="git commit to compare with")
    ap.add_argument("--runs", type=int, default=3, help="runs of each, alternating")
    ap.add_argument("--top", type=int, default=16, help="processes listed")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    base = Path(tempfile.mkdtemp(prefix="bench-base-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline],
                   cwd=ROOT, check=True, capture_output=True)
    results: dict = {"baseline": [], "this tree": []}
    try:
        for i in range(args.runs):
            for side, cwd in (("baseline", base), ("this tree", ROOT)):
                wall, used = measure(command, cwd)
                results[side].append((wall, used))
                print(f"  run {i + 1} {side:9s}  wall {wall:6.1f} s  cpu "
                      f"{sum(used.values()):6.1f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)

    def median(side, key):
        return statistics.median(key(w, u) for w, u in results[side])

    print(f"\n{' '.join(args.command[1:] if args.command[:1] == ['--'] else args.command)}")
    print(f"median of {args.runs} runs each        baseline ({args.baseline})   this tree")
    for label, key in (("wall s", lambda w, u: w), ("CPU s, all processes",
                                                     lambda w, u: sum(u.values()))):
        print(f"  {label:34s}{median('baseline', key):10.1f}{median('this tree', key):12.1f}")
    names = collections.Counter()
    for side in results.values():
        for _, used in side:
            names.update(used)
    print("  CPU s by process (median; 0: not there)")
    for name, _ in names.most_common(args.top):
        a, b = (median(side, lambda w, u, n=name: u.get(n, 0.0)) for side in results)
        print(f"    {name[:32]:32s}{a:10.2f}{b:12.2f}")


if __name__ == "__main__":
    main()
