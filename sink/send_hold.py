"""Hold mode (``--hold N``): many connections that stay in the dialogue, for tarpit tests.

Contract: :func:`run_hold` opens ``N`` connections (at most :data:`OPENING` connects in
flight, spread round-robin over ``--source`` addresses), each of which sends one
message after another with ``--hold-pause`` between them and waits as long as the
server makes it (up to ``--timeout`` per reply), never reconnecting. Every
``interval`` seconds it samples how many are alive; at the end of ``-t`` it closes
the rest. The :class:`HoldResult` says how many opened, how many were alive at each
sample, and how each connection ended (a connect still in progress at the end is
cancelled: "cut while connecting", its message unfinished); what each reply cost in
waiting is in the run's latency histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sink.send_runner import Runner

#: Connection attempts in flight at once (more only overflows the server's backlog).
OPENING = 512
#: Messages a held connection may send: as many as fit before the end of the hold.
UNLIMITED = 1 << 62


@dataclass(slots=True)
class HoldResult:
    """What a hold measured; :meth:`merge` adds another worker's."""

    requested: int
    interval: float
    #: Alive connections at ``interval``, ``2 * interval``, ... after the start.
    samples: list[int] = field(default_factory=list)
    #: How connections ended: "end of hold", "closed by server", "timeout", ...
    ends: dict[str, int] = field(default_factory=dict)

    def merge(self, other: HoldResult) -> None:
        self.requested += other.requested
        if len(other.samples) > len(self.samples):
            self.samples.extend([0] * (len(other.samples) - len(self.samples)))
        for i, alive in enumerate(other.samples):
            self.samples[i] += alive
        for key, n in other.ends.items():
            self.ends[key] = self.ends.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "interval": self.interval,
                "samples": list(self.samples), "ends": dict(self.ends)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HoldResult:
        return cls(data["requested"], data["interval"], list(data["samples"]),
                   dict(data["ends"]))


def sample_interval(duration: float) -> float:
    """One sample a second, more often for holds shorter than 10 s."""
    return 1.0 if duration >= 10 else max(0.1, duration / 10)


async def run_hold(runner: Runner, deadline: float) -> HoldResult:
    """Hold ``runner.config.hold`` connections until ``deadline`` (perf_counter time)."""
    config = runner.config
    assert config.hold is not None and config.duration is not None
    result = HoldResult(config.hold, sample_interval(config.duration))
    sessions = []
    remaining = config.hold

    def tally(session) -> None:
        reason = session.ended_by or "closed"
        result.ends[reason] = result.ends.get(reason, 0) + 1

    async def opener() -> None:
        nonlocal remaining
        while remaining > 0 and not runner.stopped and runner.pool.open():
            remaining -= 1
            session = await runner.open_session(UNLIMITED)
            if session is None:
                why = "cut while connecting" if runner.stopped else "failed to open"
                result.ends[why] = result.ends.get(why, 0) + 1
                continue
            sessions.append(session)
            session.done.add_done_callback(lambda _f, s=session: tally(s))

    async def sampler(start: float) -> None:
        k = 1
        while True:
            await asyncio.sleep(max(0.0, start + k * result.interval - time.perf_counter()))
            result.samples.append(len(runner.ctx.active))
            k += 1

    start = deadline - config.duration
    sampling = asyncio.create_task(sampler(start))
    openers = [asyncio.create_task(opener()) for _ in range(min(OPENING, config.hold))]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(runner.stopping.wait(),
                               timeout=max(0.0, deadline - time.perf_counter()))
    sampling.cancel()
    if not runner.stopped:  # the sample due at the deadline, taken before closing
        due = int(config.duration / result.interval + 1e-9)
        result.samples.extend([len(runner.ctx.active)] * (due - len(result.samples)))
    runner.interrupt("end of hold")
    await asyncio.gather(*openers)
    await asyncio.gather(*(s.done for s in sessions))
    if remaining:
        result.ends["not opened"] = remaining
    return result
