"""Commands started as a user starts them from a shell, and stopped as a user stops them (Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

# Ray gives a new node a fixed 30 s to register with its GCS (``ray/_private/node.py``); on a 2-core box busy with
# other clusters (the soak's three nodes) that can run out before a command that starts its own Ray has done
# anything of its own. The tests that start one try such a start once more; any other exit fails them.
RAY_START_TIMED_OUT = "The current node timed out during startup"

# A foreground command typed at a shell gets SIGINT with its default action and unblocked. A test process may have
# inherited it ignored or blocked (both survive fork and exec, and Python installs no KeyboardInterrupt handler for
# an ignored SIGINT), so a command it starts directly could never see a Ctrl-C. This interpreter resets both and
# then execs the command, as the shell does.
_RESET_SIGINT_AND_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                          "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                          "os.execvp(sys.argv[1], sys.argv[1:])")


def as_from_a_shell(argv: list[str]) -> list[str]:
    """``argv`` run with SIGINT as a shell leaves it for a foreground command (its default action, unblocked)."""
    return [sys.executable, "-c", _RESET_SIGINT_AND_EXEC, *argv]


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """``signum`` to the process group of ``process`` (started with ``start_new_session=True``), if any of it lives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """Ctrl-C to a server started with ``start_new_session=True`` (its whole group: Ray's processes too), then
    SIGKILL if it has not exited within ``timeout_s``; returns its exit status."""
    signal_group(process, signal.SIGINT)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGKILL)
        return process.wait()
