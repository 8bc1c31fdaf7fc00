"""The whole stack on one machine, on 127.0.0.1: a Ray head (with job submission), an S3
endpoint (moto's server) and an MLflow tracking server (SQLite + local artifacts).

    python infra/local_stack.py up            # starts all three, prints the settings
    eval "$(python infra/local_stack.py env)" # exports RAY_ADDRESS, AWS_*, MLFLOW_* here
    python infra/local_stack.py status
    python infra/local_stack.py down          # stops all three, leaves no process behind

Each service runs in its own process group; `down` stops the groups (SIGTERM, then
SIGKILL) and `ray stop`s the head, so nothing outlives it. State (ports, process ids, logs,
data) lives in `--dir` (default ~/vit-runs/local-stack). The S3 keys are moto's dummies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
DEFAULT_DIR = Path("~/vit-runs/local-stack").expanduser()
BUCKET = "vit-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; see {log}")


def wait_for_job_agent(address: str, timeout: float = 180.0, *, wait: bool = False) -> None:
    """The dashboard answers before the head's job agent has registered ("No available
    agent to submit job"): submit a no-op job with the CLI until one goes through. (A
    subprocess, because Ray reads RAY_AUTH_MODE once per process.) Accepted is enough: the
    no-op job runs on while the caller goes on (`--no-wait`: 1.7 s a try against 7.7 s for
    following it to its end); `wait=True` follows it, for a head that must be idle after."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    deadline, out = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address,
                              *([] if wait else ["--no-wait"]), "--", "true"],
                             env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            return
        time.sleep(1.0)
    last = (out.stdout + out.stderr).strip().splitlines()[-1:] if out else []
    raise TimeoutError(f"{address}: job submission not ready after {timeout:.0f} s {last}")


# MLflow 3's server starts a job runner by default (seven huey consumers polling the store,
# for its GenAI judges and trace roll-ups): about half a core, idle, on a laptop. The product
# runs no MLflow server jobs.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **(env or {})})


def settings(state: dict) -> dict[str, str]:
    return {"RAY_ADDRESS": f"http://127.0.0.1:{state['dashboard_port']}",
            "RAY_AUTH_MODE": "token",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{state['s3_port']}",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{state['mlflow_port']}",
            "VIT_BUCKET": f"s3://{BUCKET}"}


def up(root: Path, num_cpus: int | None = None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "state.json"
    if state_file.exists():
        raise SystemExit(f"a local stack is already up ({state_file}); run `down` first")
    state = {"s3_port": free_port(), "mlflow_port": free_port(), "dashboard_port": free_port(),
             "pids": {}}
    # Ray's sockets need a short path (AF_UNIX: < 108 bytes).
    state["ray_tmp"] = tempfile.mkdtemp(prefix="vitray", dir="/tmp")
    started = []
    try:
        log = root / "s3.log"
        proc = _spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                       str(state["s3_port"])], log)
        started.append(proc)
        state["pids"]["s3"] = proc.pid
        wait_http(f"http://127.0.0.1:{state['s3_port']}/", 60, proc, log)

        log = root / "mlflow.log"
        (root / "mlartifacts").mkdir(exist_ok=True)
        proc = _spawn([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                       str(state["mlflow_port"]), "--backend-store-uri",
                       f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                       str(root / "mlartifacts"), "--workers", "1"], log, MLFLOW_SERVER_ENV)
        started.append(proc)
        state["pids"]["mlflow"] = proc.pid

        log = root / "ray.log"
        cmd = [str(BIN / "ray"), "start", "--head", "--block",
               f"--port={free_port()}", f"--dashboard-port={state['dashboard_port']}",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               f"--temp-dir={state['ray_tmp']}",
               # Free ports for every agent: the defaults (e.g. 52365) may be held by another
               # Ray on this machine, and an agent that cannot bind leaves the head without
               # job submission ("No available agent to submit job").
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}",
               f"--ray-client-server-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}"]
        if num_cpus:
            cmd.append(f"--num-cpus={num_cpus}")
        # This interpreter's folder first on PATH: `python` in a submitted job's entrypoint
        # is then the one with the project's dependencies.
        # No drain on `down`: Ray's head otherwise waits up to 30 s on SIGTERM for Serve
        # replicas to move away (`_drain_node_before_shutdown`); this one has none.
        proc = _spawn(cmd, log, {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                                 "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                                 "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                                 **{k: v for k, v in settings(state).items()
                                    if k.startswith("AWS_")}})
        started.append(proc)
        state["pids"]["ray"] = proc.pid
        wait_http(f"http://127.0.0.1:{state['mlflow_port']}/health", 180, started[1],
                  root / "mlflow.log")
        wait_http(f"http://127.0.0.1:{state['dashboard_port']}/api/version", 180, proc, log)
        wait_for_job_agent(settings(state)["RAY_ADDRESS"])

        import boto3

        boto3.client("s3", endpoint_url=settings(state)["AWS_ENDPOINT_URL"],
                     aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
    except BaseException:
        for p in started:
            _stop_group(p.pid)
        shutil.rmtree(state["ray_tmp"], ignore_errors=True)
        raise
    state_file.write_text(json.dumps(state, indent=2))
    return state


def _alive(pid: int) -> bool:
    """Is any process of the group led by `pid` left? The leader is reaped first where it is
    this process's child (`up` and `down` in one process, as in the demo): a zombie still
    counts as a member of its group, and `down` used to wait out its 20 s per service."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass                                  # not our child: its parent or init reaps it
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(pid: int, timeout: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down(root: Path) -> bool:
    state_file = root / "state.json"
    if not state_file.exists():
        return False
    state = json.loads(state_file.read_text())
    # Ray first: its workers may still be talking to S3 and MLflow.
    ray_tmp = state.get("ray_tmp")
    for name in ("ray", "mlflow", "s3"):
        pid = state["pids"].get(name)
        if pid:
            _stop_group(pid)
    if ray_tmp:
        # Processes Ray started in other sessions (workers) are found through its temp dir.
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    state_file.unlink()
    return True


def status(root: Path) -> dict:
    state_file = root / "state.json"
    if not state_file.exists():
        return {}
    state = json.loads(state_file.read_text())
    return {name: _alive(pid) for name, pid in state["pids"].items()}


def main(argv=None) -> int:
    from pipeline import cli

    ap = cli.parser(__doc__, prog="vit-stack")
    ap.add_argument("command", choices=["up", "down", "status", "env"],
                    help="up: start the three services; down: stop them; status: which run; "
                         "env: the settings to export, as shell lines")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                    help="the stack's state: ports, process ids, logs, data")
    ap.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    cli.add_common(ap, mlflow=False)
    args = ap.parse_args(argv)
    cli.configure_logging(args.log_level)
    root = args.dir.expanduser().resolve()
    if args.command == "up":
        state = up(root, args.num_cpus)
        print(f"local stack up (state in {root}):")
        for k, v in settings(state).items():
            print(f"  {k}={v}")
        print(f'use it:  eval "$({sys.executable} {__file__} env --dir {root})"')
        return 0
    if args.command == "down":
        print("local stack stopped" if down(root) else "no local stack is up")
        return 0
    if args.command == "env":
        state_file = root / "state.json"
        if not state_file.exists():
            print("no local stack is up", file=sys.stderr)
            return 1
        for k, v in settings(json.loads(state_file.read_text())).items():
            print(f"export {k}={v}")
        return 0
    alive = status(root)
    if not alive:
        print("no local stack is up")
        return 1
    for name, ok in alive.items():
        print(f"  {name:<7} {'running' if ok else 'STOPPED'}")
    return 0 if all(alive.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
