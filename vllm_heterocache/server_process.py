"""A ``vllm serve`` server as a child process: started in a process group of its own, waited for
until it serves, stopped as a group. The one lifecycle of ``heterocache demo``, the benchmarks
and the tests that start servers.

A server started here leads a new session and process group (``start_new_session``), so that a
terminal's Ctrl-C reaches the parent only and the parent stops the server in order, and so that
:func:`stop` reaches vLLM's engine processes too (they stay in the group). ``die_with_parent``
also has Linux send the server SIGTERM if the parent dies without stopping it (SIGKILL, a
crash). Servers started and not yet stopped are tracked (:func:`stop_all`, for a benchmark's
exit path).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

STOP_GRACE_S = 30.0  # from SIGTERM to SIGKILL for a server's process group
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_RUNNING: set[int] = set()  # process groups started here and not yet stopped


class ServerFailed(RuntimeError):
    """The server exited, or did not serve in time, while starting (the message ends with its log's tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def start(cmd: list[str], *, env: dict[str, str] | None = None, log: Path | None = None,
          die_with_parent: bool = False, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` leading a process group of its own; its output goes to ``log`` (None: ours)."""
    out = open(log, "wb") if log is not None else None  # noqa: SIM115 (the child holds it; closed below)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                                env=env, cwd=cwd, start_new_session=True,
                                preexec_fn=_die_with_parent() if die_with_parent else None)
    finally:
        if out is not None:
            out.close()
    _RUNNING.add(proc.pid)
    return proc


def wait_ready(proc: subprocess.Popen, base: str, *, timeout: float, model: str | None = None,
               log: Path | None = None) -> float:
    """Wait until the server at ``base`` answers ``/health`` and lists ``model`` (any model when
    None) on ``/v1/models``; returns the seconds it took. Raises :class:`ServerFailed` when the
    server exits first or ``timeout`` seconds pass."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with status {proc.returncode} while starting{_tail_of(log)}")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            if _get(f"{base}/health")[0] == 200:
                status, body = _get(f"{base}/v1/models")
                served = {m["id"] for m in json.loads(body).get("data", [])}
                if status == 200 and served and (model is None or model in served):
                    return time.monotonic() - t0
        time.sleep(1.0)
    raise ServerFailed(f"the server did not become ready within {timeout:.0f} s{_tail_of(log)}")


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> bool:
    """Stop the process group ``proc`` leads: SIGTERM, and after ``grace`` seconds SIGKILL to
    whatever is left. Stop signals are ignored meanwhile (in the main thread), so a second Ctrl-C
    cannot cut this short and leave the server running. Returns whether it stopped within the
    grace (False: it was killed)."""
    with _ignoring(STOP_SIGNALS):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # the whole group is gone already
            proc.wait()
            _RUNNING.discard(proc.pid)
            return True
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        in_grace = _gone_by(proc.pid, deadline)  # (engine processes may still be exiting)
        if not in_grace:
            print(f"the server (process group {proc.pid}) did not stop within {grace:.0f} s of SIGTERM: killing it",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _gone_by(proc.pid, time.monotonic() + 10.0)
        proc.wait()
        if group_alive(proc.pid):
            print(f"warning: process group {proc.pid} still has processes after SIGKILL", file=sys.stderr, flush=True)
        else:
            _RUNNING.discard(proc.pid)
        return in_grace


def stop_all(grace: float = 15.0) -> None:
    """Stop every server started here and not stopped yet (a benchmark's exit path)."""
    for pgid in list(_RUNNING):
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if _gone_by(pgid, time.monotonic() + wait):
                break
        _RUNNING.discard(pgid)


def _gone_by(pgid: int, deadline: float) -> bool:
    """Wait until process group ``pgid`` is gone or ``time.monotonic()`` reaches ``deadline``;
    whether it is gone."""
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not group_alive(pgid)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (Linux: zombies, which ``kill(0)`` still finds,
    do not count)."""
    if not sys.platform.startswith("linux"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: the id is another user's group now
            return False
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _tail_of(log: Path | None) -> str:
    return f"; last lines of {log}:\n{log_tail(log)}" if log is not None else " (see its log above)"


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@contextlib.contextmanager
def handling(signals: tuple[signal.Signals, ...], handler: Callable | int) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block (main thread only: elsewhere, nothing changes)."""
    if not _main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignoring(signals: tuple[signal.Signals, ...]):
    return handling(signals, signal.SIG_IGN)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies, however it
    dies (Linux ``prctl(PR_SET_PDEATHSIG)``, which survives ``exec``); None on other systems."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG, SIGTERM) failed")
        if os.getppid() != parent:  # the parent died before the prctl: do not start an orphan
            os._exit(1)

    return preexec
