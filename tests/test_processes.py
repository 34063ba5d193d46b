"""``testing.processes.as_from_a_shell``: a command started from a process that ignores and blocks SIGINT still gets
Ctrl-C as from a shell (the CLI's Ctrl-C tests and the servers the tests stop with Ctrl-C rely on it)."""

from __future__ import annotations

import json
import subprocess
import sys

from testing.processes import as_from_a_shell

# Prints how the started command finds SIGINT: Python's handler installed, and whether it is blocked.
SHOW_SIGINT = ("import json, signal; print(json.dumps({'handler': repr(signal.getsignal(signal.SIGINT)), "
               "'blocked': signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])}))")

# A parent that ignores and blocks SIGINT, then starts ``argv`` (JSON on the command line) and relays its output.
PARENT = ("import json, signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
          "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}); "
          "print(subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True).stdout, end='')")


def sigint_of(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PARENT, json.dumps(argv)], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def test_a_command_started_directly_inherits_an_ignored_and_blocked_sigint():
    assert sigint_of([sys.executable, "-c", SHOW_SIGINT]) == {"handler": "<Handlers.SIG_IGN: 1>", "blocked": True}


def test_a_command_started_as_from_a_shell_gets_the_default_sigint():
    assert sigint_of(as_from_a_shell([sys.executable, "-c", SHOW_SIGINT])) == {
        "handler": "<built-in function default_int_handler>", "blocked": False}
