"""``spamsink send``: the smtpsend-compatible SMTP load generator.

Contract of :func:`run`: takes the options parsed by ``sink.cli`` and returns the exit
status: 0 when every message was sent, 1 when any failed (or, in a hold, when a
message failed), 2 for a command line that cannot run (one line on stderr), 130 when
interrupted. The summary goes to stdout: smtpsend's three lines and the rest
(:mod:`sink.send_report`), or with ``--json`` one JSON object. :func:`main` is
:func:`run` for the command line: when this process is that command, it ends the
process with the status at once.

The pieces: :mod:`sink.send_config` (validation), :mod:`sink.send_runner` (one event
loop's senders), :mod:`sink.send_session` (the SMTP client protocol),
:mod:`sink.send_workers` (``--procs``), :mod:`sink.send_hold` (``--hold``),
:mod:`sink.send_report` (the summary).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
from collections.abc import Sequence

from sink.send_config import SendConfig, UsageError, config_from_options
from sink.send_progress import ProgressLine, progress_wanted
from sink.send_runner import Runner, RunResult, use_uvloop

#: File descriptors kept free for the interpreter, the terminal and the event loop.
_SPARE_FDS = 64


def raise_file_limit(connections: int) -> str | None:
    """Raise RLIMIT_NOFILE so ``connections`` sockets fit; a warning line when they do
    not (and the run goes on with what the limit allows)."""
    needed = connections + _SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return None
    try:
        if hard != resource.RLIM_INFINITY and hard < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))  # root only
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return None
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return (f"warning: {connections} connections need {needed} file descriptors but the "
                f"limit is {hard}; raise it (ulimit -n, or LimitNOFILE=) to open them all")


def _run_here(config: SendConfig, progress: ProgressLine | None) -> RunResult:
    use_uvloop()
    publish = progress.update if progress is not None else None
    return asyncio.run(Runner(config, publish=publish).run())


def execute(config: SendConfig) -> RunResult:
    """Run ``config`` in this process or over ``--procs`` workers; the merged result."""
    progress = ProgressLine(config) if progress_wanted(config) else None
    try:
        if config.procs > 1:
            # Imported here: multiprocessing adds ~10 ms to every start otherwise.
            from sink.send_workers import run_workers

            return run_workers(config, progress)
        return _run_here(config, progress)
    finally:
        if progress is not None:
            progress.clear()


def exit_status(result: RunResult) -> int:
    """0 all sent, 1 any failed, 130 interrupted (see the module contract)."""
    if result.interrupted:
        return 130
    return 1 if result.stats.failed else 0


def run(options: argparse.Namespace) -> int:
    """Entry point of ``spamsink send`` (see the module contract)."""
    from sink.send_report import render_text, summary

    try:
        config = config_from_options(options)
    except UsageError as exc:
        print(f"spamsink send: {exc}", file=sys.stderr)
        return 2
    per_process = -(-config.senders // config.procs)
    warning = raise_file_limit(per_process)
    if warning:
        print(f"spamsink send: {warning}", file=sys.stderr)
    try:
        result = execute(config)
    except RuntimeError as exc:
        print(f"spamsink send: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the event loop took over SIGINT
        return 130
    data = summary(result, config)
    try:
        if config.json:
            import json

            print(json.dumps(data), flush=True)
        else:
            print(render_text(data), flush=True)
    except BrokenPipeError:  # ``| head``: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return exit_status(result)


def main(options: argparse.Namespace, argv: Sequence[str]) -> int:
    """:func:`run`; when ``argv`` is this process's own command line (the ``spamsink``
    command, not a caller in Python), end the process with the status at once, without
    the interpreter's teardown: after the summary nothing is left to clean up (sockets
    are closed, worker processes joined), and the teardown would add ~15 ms to every
    run. While a worker process is still alive the status is returned, for the normal
    exit that stops daemonic workers."""
    status = run(options)
    if list(argv) != sys.argv[1:]:
        return status
    workers = sys.modules.get("multiprocessing")
    if workers is not None and workers.active_children():
        return status
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(status)
