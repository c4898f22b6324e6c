"""Deadlines: many coarse timers on one loop timer, never early, cancellable."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from sink.deadlines import Deadlines

RESOLUTION = 0.02


class Item:
    """A hashable thing to schedule; remembers when it fired."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fired: list[float] = []


def recording_deadlines(loop: asyncio.AbstractEventLoop) -> Deadlines[Item]:
    """Deadlines whose firing appends the loop time to the item."""
    return Deadlines(loop, RESOLUTION, lambda item: item.fired.append(loop.time()))


def run(scenario) -> None:
    asyncio.run(scenario())


def test_items_fire_after_their_deadline_within_the_resolution() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadlines = recording_deadlines(loop)
        start = loop.time()
        items = {delay: Item(str(delay)) for delay in (0.0, 0.05, 0.13, 0.2)}
        for delay, item in items.items():
            deadlines.schedule(item, start + delay)
        assert len(deadlines) == 4
        await asyncio.sleep(0.4)
        for delay, item in items.items():
            assert len(item.fired) == 1, item.name
            late = item.fired[0] - (start + delay)
            assert late >= -1e-3, f"{item.name} fired {-late:.3f} s early"
            assert late < RESOLUTION + 0.05, f"{item.name} fired {late:.3f} s late"
        assert len(deadlines) == 0

    run(scenario)


def test_cancel_and_reschedule() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadlines = recording_deadlines(loop)
        now = loop.time()
        cancelled, moved, never_scheduled = Item("cancelled"), Item("moved"), Item("none")
        deadlines.schedule(cancelled, now + 0.05)
        deadlines.schedule(moved, now + 0.05)
        deadlines.schedule(moved, now + 0.2)  # scheduling again moves it
        deadlines.cancel(cancelled)
        deadlines.cancel(never_scheduled)  # no deadline: nothing happens
        await asyncio.sleep(0.12)
        assert cancelled.fired == [] and moved.fired == []
        await asyncio.sleep(0.2)
        assert len(moved.fired) == 1 and moved.fired[0] >= now + 0.2 - 1e-3
        assert cancelled.fired == []

    run(scenario)


def test_fire_may_reschedule_the_item_and_cancel_others_in_its_bucket() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        a, b = Item("a"), Item("b")
        deadlines: Deadlines[Item]

        def fire(item: Item) -> None:
            item.fired.append(loop.time())
            other = b if item is a else a
            deadlines.cancel(other)  # same bucket, not yet fired: must not fire now
            if len(item.fired) < 3:
                deadlines.schedule(item, loop.time())  # due at once: a later tick

        deadlines = Deadlines(loop, RESOLUTION, fire)
        now = loop.time()
        deadlines.schedule(a, now + 0.03)
        deadlines.schedule(b, now + 0.03)
        await asyncio.sleep(0.3)
        fired = [item for item in (a, b) if item.fired]
        assert len(fired) == 1, "the cancelled item in the firing bucket fired too"
        times = fired[0].fired
        assert len(times) == 3
        assert all(later > earlier for earlier, later in itertools.pairwise(times))
        assert len(deadlines) == 0

    run(scenario)


def test_the_tick_stops_when_nothing_is_scheduled_and_restarts() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadlines = recording_deadlines(loop)
        item = Item("x")
        deadlines.schedule(item, loop.time())
        await asyncio.sleep(0.1)
        assert deadlines._handle is None  # idle: no timer left on the loop
        later = loop.time() + 0.05
        deadlines.schedule(item, later)
        await asyncio.sleep(0.15)
        assert len(item.fired) == 2 and item.fired[1] >= later - 1e-3
        deadlines.schedule(item, loop.time() + 10)
        deadlines.close()
        assert len(deadlines) == 0 and deadlines._handle is None

    run(scenario)


def test_resolution_must_be_positive() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError):
            Deadlines(asyncio.get_running_loop(), 0, print)

    run(scenario)


def test_a_rate_limits_fires_per_second_and_keeps_deadline_order() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[Item] = []
        deadlines: Deadlines[Item] = Deadlines(loop, RESOLUTION, fired.append, rate=100.0)
        now = loop.time()
        early = [Item(f"early{i}") for i in range(100)]
        late = [Item(f"late{i}") for i in range(100)]
        for item in early:
            deadlines.schedule(item, now)
        for item in late:
            deadlines.schedule(item, now + 0.1)
        started = loop.time()
        while len(deadlines):
            await asyncio.sleep(RESOLUTION)
        took = loop.time() - started
        # 200 fires at 100/s with a 0.1 s burst: about 1.9 s, never much less.
        assert 1.6 < took < 3.0, took
        assert set(fired[:100]) == set(early), "a later deadline fired before an earlier one"
        assert len(fired) == 200

    run(scenario)


def test_rate_must_be_positive() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError):
            Deadlines(asyncio.get_running_loop(), 0.01, print, rate=0)

    run(scenario)


def test_a_failing_callback_is_reported_and_the_others_still_fire() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        fired: list[str] = []

        def fire(item: Item) -> None:
            if item.name == "bad":
                raise RuntimeError("boom")
            fired.append(item.name)

        deadlines: Deadlines[Item] = Deadlines(loop, RESOLUTION, fire)
        now = loop.time()
        deadlines.schedule(Item("bad"), now)
        deadlines.schedule(Item("same bucket"), now)
        await asyncio.sleep(0.1)
        deadlines.schedule(Item("later"), loop.time() + 0.02)  # the tick still runs
        await asyncio.sleep(0.1)
        assert fired == ["same bucket", "later"]
        assert len(reported) == 1 and isinstance(reported[0]["exception"], RuntimeError)

    run(scenario)


def test_closing_from_a_callback_stops_firing() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[Item] = []
        deadlines: Deadlines[Item]

        def fire(item: Item) -> None:
            fired.append(item)
            deadlines.close()

        deadlines = Deadlines(loop, RESOLUTION, fire)
        for name in "abc":
            deadlines.schedule(Item(name), loop.time())
        await asyncio.sleep(0.1)
        assert len(fired) == 1 and len(deadlines) == 0

    run(scenario)


def test_the_budget_refills_while_nothing_is_scheduled() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadlines: Deadlines[Item] = Deadlines(loop, RESOLUTION, lambda _: fired.append(
            loop.time()), rate=10.0)  # a burst of one: one fire per 0.1 s
        deadlines.schedule(Item("first"), loop.time())
        await asyncio.sleep(0.3)  # idle: the tick stops, the bucket refills
        asked = loop.time()
        deadlines.schedule(Item("second"), asked)
        await asyncio.sleep(0.1)
        assert len(fired) == 2 and fired[1] - asked < 2 * RESOLUTION + 0.03

    run(scenario)
