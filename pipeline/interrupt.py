"""Ctrl-C and SIGTERM for the commands: stop cleanly on the first, at once on the second.

SIGINT is Ctrl-C; SIGTERM is what `ray job stop`, Kubernetes (pod deletion, preemption) and
Slurm send. The first of either raises `Interrupted` in the main thread, wherever it is
(starting Ray, training, uploading a checkpoint, a VTAB trial, writing shards); it derives from
BaseException, as KeyboardInterrupt does, so no `except Exception` swallows it, and each
command's cleanup runs on its way out: the MLflow run is marked KILLED, workers are stopped,
staging folders are removed, the Ray processes the command started are shut down. The command
then prints one line and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM),
as a shell does. A second signal during that cleanup exits at once with the same code.

Ray's own handlers are replaced: `ray.init` makes SIGTERM call `sys.exit(15)` (no cleanup, a
plain exit code), and Ray Train's trainer makes SIGINT abort the controller and `sys.exit(0)`.
`install()` is called again after `ray.init` for that reason. The driver also goes without
Ray's C++ failure-signal handler (Abseil's, installed when `ray.init` starts the driver's core
worker): it catches SIGTERM as a crash, prints a native stack dump and may abort (exit 134)
before ours runs. `install()` sets `RAY_DISABLE_FAILURE_SIGNAL_HANDLER` before Ray is imported
(Ray reads it at import) and `ray_init` takes it out of the environment again, so the processes
Ray starts (GCS, raylet, workers) keep theirs; Python's `faulthandler` still reports a
crash of the driver.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The command was asked to stop (SIGINT or SIGTERM). `detail`: where it stopped."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail = signum, detail

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        return f"interrupted by {self.name}" + (f": {self.detail}" if self.detail else "")


_received: list[int] = []
_deferred: list = []         # callbacks of the `deferred` blocks the main thread is in
_running = False             # inside `run`: the command has started something to clean up
_original: dict = {}         # the handlers `install` replaced, put back when `run` returns
_half_started = False       # interrupted inside `ray.init`: its driver is half connected
_NO_RAY_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
# Set before `ray_init` starts a local Ray: every process of that Ray (GCS, raylet, workers)
# inherits it, so that what is left of them when the command ends can be found.
_LOCAL_RAY_MARK = "VIT_LOCAL_RAY"
_set_no_ray_handler = False  # `install` set it (and `ray_init` takes it away again)


def _handler(signum, frame):
    if not _running:
        # Still importing: nothing started, nothing written.
        os.write(2, f"interrupted by {signal.Signals(signum).name}\n".encode())
        os._exit(128 + signum)
    if _received:
        # The second signal: the user (or the orchestrator's grace period) will not wait.
        os.write(2, f"\n{signal.Signals(signum).name} again: exiting now\n".encode())
        _kill_local_ray()
        os._exit(128 + signum)
    _received.append(signum)
    os.write(2, f"\n{signal.Signals(signum).name}: stopping cleanly (send it again to exit "
                f"at once)\n".encode())
    if _deferred:
        _deferred[-1]()
        return
    raise Interrupted(signum)


def _kill_local_ray() -> None:
    """SIGKILL the Ray processes this command started (a local Ray: GCS, raylet, workers),
    which would otherwise outlive it for a minute; a cluster's are not ours to stop."""
    worker = sys.modules.get("ray._private.worker")
    node = getattr(worker, "_global_node", None) if worker else None
    if node is not None and getattr(node, "head", False):
        # SIGKILL each of them and what they started, without waiting (Node.kill_all_processes
        # waits for every one). Their children by parentage: the raylet's two agents set
        # their process titles, which can overwrite what /proc shows of their environment,
        # mark included (seen: both alive seconds after a second Ctrl-C).
        roots = [info.process.pid for infos in list(getattr(node, "all_processes", {}).values())
                 for info in infos]
        for pid in descendants(roots) + roots:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:            # gone already
                pass
    # Whatever else carries this command's mark: also when a shutdown the first signal began
    # had already let go of the node (seen: Ray's two agents left alive by a second Ctrl-C).
    sweep_local_ray()


def sweep_local_ray() -> list[int]:
    """SIGKILL whatever is left of the local Ray this command started (its processes carry
    the command's `_LOCAL_RAY_MARK`), once that Ray is shut down: its workers normally go with
    the raylet, but one whose interpreter hangs on its way out would outlive the command for
    good (seen once: a Train controller whose core worker had shut down, waiting on a lock,
    in a process group of its own). -> the pids killed. Linux (/proc) only."""
    mark = os.environ.get(_LOCAL_RAY_MARK)
    return kill_processes_with(_LOCAL_RAY_MARK, mark) if mark else []


def kill_processes_with(variable: str, value: str) -> list[int]:
    """SIGKILL the processes `processes_with` finds -> the pids killed."""
    killed = []
    for pid in processes_with(variable, value):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:            # gone already
            continue
    return killed


def descendants(roots: list[int]) -> list[int]:
    """Every live descendant of the processes `roots` (by /proc's parent pids). Linux only:
    elsewhere, none."""
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(pid))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_with(variable: str, value: str) -> list[int]:
    """The live processes (this one aside) whose environment holds `variable=value`: what a
    process started inherits. Linux (/proc) only: elsewhere, none."""
    if not os.path.isdir("/proc"):
        return []
    needle = f"{variable}={value}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:            # gone already, or not ours to read
            continue
    return found


@contextlib.contextmanager
def deferred(on_signal):
    """Within this block the first signal calls `on_signal()` instead of raising; the block's
    code checks `received()` when it returns. For blocking calls into extensions that do not
    pass on an exception raised by a handler (Ray's `ray.get` in C++ turns it into
    "SystemError: ... returned a result with an exception set"): `on_signal` makes the call
    return instead (Ray Train: abort the controller, and `fit()` ends)."""
    def guarded():
        try:
            on_signal()
        except Exception:  # noqa: BLE001 - a failing callback must not hide the signal
            pass

    _deferred.append(guarded)
    if _received:      # a signal came already, and its Interrupted was lost (`_unraisable`)
        guarded()
    try:
        yield
    finally:
        _deferred.remove(guarded)


def _unraisable(default):
    """`sys.unraisablehook`: an `Interrupted` raised where Python cannot raise (the handler ran
    inside a callback: logging's at-fork hook while Ray starts its processes) is dropped
    quietly; the signal stays in `received()`, and the next `deferred` block acts on it."""
    def hook(unraisable):
        if not isinstance(unraisable.exc_value, Interrupted):
            default(unraisable)

    return hook


def install() -> None:
    """Make SIGINT and SIGTERM raise `Interrupted` (from the main thread only)."""
    global _set_no_ray_handler
    if threading.current_thread() is not threading.main_thread():
        return
    if "ray" not in sys.modules and _NO_RAY_HANDLER not in os.environ:
        os.environ[_NO_RAY_HANDLER] = "1"
        _set_no_ray_handler = True
        if not faulthandler.is_enabled():
            faulthandler.enable()
    for sig in SIGNALS:
        previous = signal.signal(sig, _handler)
        if previous is not _handler:
            _original.setdefault(sig, previous)
    if not getattr(sys.unraisablehook, "_vit_interrupt", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
        sys.unraisablehook._vit_interrupt = True


def ray_init(**kwargs):
    """`ray.init(**kwargs)`, then this module's handlers again: `ray.init` installs its own
    SIGTERM handler (`sys.exit(15)`); a SIGTERM that comes while it starts is turned into
    `Interrupted` too."""
    global _set_no_ray_handler
    import ray

    if _set_no_ray_handler:   # read at import; Ray's own processes keep their handler
        os.environ.pop(_NO_RAY_HANDLER, None)
        _set_no_ray_handler = False
    global _half_started
    if kwargs.get("address") == "local":
        os.environ[_LOCAL_RAY_MARK] = f"{os.getpid()}-{os.urandom(4).hex()}"
    try:
        context = ray.init(**kwargs)
    except SystemExit as exit_:
        if exit_.code == signal.SIGTERM and _running:
            _received.append(signal.SIGTERM)
            _half_started = True
            raise Interrupted(signal.SIGTERM) from None
        raise
    except Interrupted:
        _half_started = True
        raise
    install()
    return context


def _exit_half_started(code: int) -> None:
    """Exit now, skipping the interpreter's teardown: Ray's exit hook would shut down a
    driver that `ray.init` had not finished connecting, and that crashes (SIGSEGV). The
    command's own cleanup has run; the local Ray processes it started are killed."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    _kill_local_ray()
    os._exit(code)


def received() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _received[0] if _received else None


def run(main, argv=None) -> int:
    """Run a command's `main(argv)` with the handlers installed: an interrupt anywhere ends
    it with one line on stderr and exit code 128 + signal. With `argv` None the command is
    this process's own (a console script, `python jobs/...`), and the process exits when it
    returns (`exit_now`); called with a list (tests, notebooks), it returns the code."""
    code = _run(main, argv)
    if argv is None and threading.current_thread() is threading.main_thread():
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End the process with `code`: the exit hooks run (Ray's shutdown, MLflow's, logging's),
    the streams are flushed, and the interpreter's own teardown is skipped: after a command
    that used torch and Ray, that teardown (destructors of extension modules, no Python
    left to run) took 2 s, as long as the smoke preset's training (bench/startup.py)."""
    import atexit

    atexit._run_exitfuncs()
    sweep_local_ray()              # after Ray's own shutdown (an exit hook): what it left
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):       # a closed pipe: nothing left to say there
            pass
    os._exit(code)


def _run(main, argv) -> int:
    global _running
    install()
    _running = True
    try:
        try:
            code = main(argv)
        except Interrupted as stop:
            print(stop.line(), file=sys.stderr, flush=True)
            if _half_started:
                _exit_half_started(stop.exit_code)
            return stop.exit_code
        except BaseException:
            if not _received:
                raise
            # Raised inside an extension that mangled the Interrupted (a SystemError from
            # Ray's C++ code): still the signal's exit.
            code = 1
        if _received and code != 0:
            stop = Interrupted(_received[0])
            print(stop.line(), file=sys.stderr, flush=True)
            return stop.exit_code
        return code
    finally:
        # Called in-process (tests, notebooks): leave the caller's handlers as they were.
        _running = False
        _received.clear()
        if threading.current_thread() is threading.main_thread():
            for sig, previous in _original.items():
                signal.signal(sig, previous)
            _original.clear()
