"""``--procs N``: one event loop per process, for more than one core.

Contract: :func:`run_workers` forks ``config.procs`` workers, each running
:meth:`SendConfig.share` of the run on its own uvloop, and returns their merged
:class:`RunResult`. Workers share nothing on the hot path: each publishes its counters
into its own slot of a shared array a few times a second (for the progress line) and
sends its result through its own pipe at the end. The parent sleeps in ``wait()`` on
those pipes (no busy loop) and forwards SIGINT/SIGTERM to the workers, which run in
their own process groups so that a terminal's Ctrl-C reaches each of them once. A worker that
dies without a result raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection, wait

from sink.send_config import SendConfig
from sink.send_progress import ProgressLine
from sink.send_runner import PUBLISH_INTERVAL, Runner, RunResult, use_uvloop

_FIELDS = 3  # sent, failed, open connections


def _worker(config: SendConfig, index: int, pipe: Connection, counters) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the runner installs its handler
    # Out of the terminal's process group: a Ctrl-C reaches the parent alone, which
    # forwards it once (a worker given it twice would abort instead of closing).
    os.setpgid(0, 0)
    use_uvloop()
    base = index * _FIELDS

    def publish(sent: int, failed: int, alive: int) -> None:
        counters[base], counters[base + 1], counters[base + 2] = sent, failed, alive

    result = asyncio.run(Runner(config, worker_prefix=f"{index}.", publish=publish).run())
    pipe.send(result.to_dict())
    pipe.close()


def run_workers(config: SendConfig, progress: ProgressLine | None) -> RunResult:
    """Run ``config`` over ``config.procs`` processes (see the module contract)."""
    context = multiprocessing.get_context("fork")
    parts = config.procs
    counters = context.RawArray("q", parts * _FIELDS)
    workers = []
    pipes: dict[Connection, int] = {}
    for index in range(parts):
        receive, send = context.Pipe(duplex=False)
        proc = context.Process(target=_worker, args=(config.share(index, parts), index, send,
                                                     counters), daemon=True)
        proc.start()
        send.close()
        workers.append(proc)
        pipes[receive] = index

    def forward(signum: int, frame: object) -> None:
        for proc in workers:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    merged: RunResult | None = None
    try:
        while pipes:
            for ready in wait(list(pipes), timeout=PUBLISH_INTERVAL):
                index = pipes.pop(ready)  # type: ignore[call-overload]
                try:
                    data = ready.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise RuntimeError(f"send worker {index} died without a result "
                                       f"(exit status {workers[index].exitcode})") from None
                part = RunResult.from_dict(data)
                if merged is None:
                    merged = part
                else:
                    merged.merge(part)
            if progress is not None:
                totals = [sum(counters[i * _FIELDS + f] for i in range(parts))
                          for f in range(_FIELDS)]
                progress.update(*totals)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for proc in workers:
            proc.join(timeout=5)
    assert merged is not None
    return merged
