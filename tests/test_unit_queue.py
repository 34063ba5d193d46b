"""A Denoiser replica's GPU queue (``UnitQueue``): shortest remaining job first with ageing and anticipation, and
the round-robin and FIFO orders kept for comparison; cancelled waiters never wedge it.

Each scenario runs on a real event loop; ``clock`` is a stand-in only where ageing is checked (seconds would make
the test slow), and the anticipation windows are a few milliseconds of real time.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.workers.unit_queue import UnitQueue


async def _run_through(gate: UnitQueue, arrivals: list[tuple[str, int]], hold_s: float = 0.001) -> list[str]:
    """Each arrival (key, remaining) takes the gate for ``hold_s``; the first finds it idle, the rest queue."""
    order = []

    async def unit(key: str, remaining: int, index: int) -> None:
        async with gate.hold(key, remaining):
            order.append(f"{key}{index}")
            await asyncio.sleep(hold_s)

    await asyncio.gather(*(unit(key, remaining, i) for i, (key, remaining) in enumerate(arrivals)))
    return order


def test_round_robin_and_fifo_orders():
    arrivals = [("a", 0)] * 6 + [("b", 0), ("c", 0), ("b", 0)]  # job a queued a whole step before b and c arrived
    order = asyncio.run(asyncio.wait_for(_run_through(UnitQueue("round_robin"), arrivals), 5))
    assert order == ["a0", "b6", "c7", "a1", "b8", "a2", "a3", "a4", "a5"]
    fifo = asyncio.run(asyncio.wait_for(_run_through(UnitQueue("fifo"), arrivals), 5))
    assert fifo == ["a0", "a1", "a2", "a3", "a4", "a5", "b6", "c7", "b8"]  # b waits behind a's whole step


def test_the_job_with_the_least_work_left_goes_first_and_a_job_keeps_its_arrival_order():
    # long job L (300 rows left) queued 4 units; then S (6 rows) and M (60 rows) arrive
    arrivals = [("L", 300)] * 4 + [("M", 60), ("S", 6), ("S", 6), ("M", 60)]
    order = asyncio.run(asyncio.wait_for(_run_through(UnitQueue(anticipation=0), arrivals), 5))
    assert order == ["L0", "S5", "S6", "M4", "M7", "L1", "L2", "L3"]


def test_ageing_lets_a_long_waiting_unit_go_before_newer_short_ones():
    """A unit's priority is remaining x (1 - waited/ageing_s): after ageing_s it goes before any newer unit."""
    now = [0.0]

    async def scenario() -> list[str]:
        gate, order = UnitQueue(ageing_s=10.0, anticipation=0, clock=lambda: now[0]), []
        running = asyncio.Event()
        release = asyncio.Event()

        async def unit(key: str, remaining: int, wait: asyncio.Event | None = None) -> None:
            async with gate.hold(key, remaining):
                order.append(key)
                if wait is not None:
                    running.set()
                    await wait.wait()

        first = asyncio.ensure_future(unit("x", 1, release))
        await running.wait()
        long_unit = asyncio.ensure_future(unit("long", 1000))  # waits from t = 0
        await asyncio.sleep(0)
        now[0] = 9.5  # long's priority is now 1000 x 0.05 = 50
        short = asyncio.ensure_future(unit("short", 40))
        medium = asyncio.ensure_future(unit("medium", 60))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, long_unit, short, medium)
        return order

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == ["x", "short", "long", "medium"]


def test_the_replica_waits_for_the_next_unit_of_the_shortest_job():
    """S's unit ends while L's units wait; S sends another step, which arrives 20 ms later (well within the 200 ms
    its unit ran): the replica holds itself for S instead of starting an L unit. With anticipation off it does
    not, and S's next unit waits for an L unit (300 ms)."""

    async def scenario(anticipation: float) -> tuple[list[str], int]:
        gate, order = UnitQueue(anticipation=anticipation), []

        async def unit(key: str, remaining: int, continues: bool, run_s: float) -> None:
            async with gate.hold(key, remaining, continues):
                order.append(key)
                await asyncio.sleep(run_s)

        short = asyncio.ensure_future(unit("S", 12, True, 0.2))
        await asyncio.sleep(0.001)
        longs = [asyncio.ensure_future(unit("L", 300, True, 0.3)) for _ in range(3)]
        await short
        await asyncio.sleep(0.02)  # the Orchestrator fuses S's step and sends the next
        await asyncio.gather(unit("S", 6, False, 0.001), *longs)
        return order, gate.anticipated

    assert asyncio.run(asyncio.wait_for(scenario(1.0), 5)) == (["S", "S", "L", "L", "L"], 1)
    assert asyncio.run(asyncio.wait_for(scenario(0.0), 5)) == (["S", "L", "S", "L", "L"], 0)


def test_anticipation_ends_when_the_awaited_unit_does_not_come_or_a_shorter_one_does():
    async def scenario(newcomer: tuple[str, int] | None) -> list[str]:
        gate, order = UnitQueue(anticipation=1.0), []

        async def unit(key: str, remaining: int, continues: bool = False, run_s: float = 0.001) -> None:
            async with gate.hold(key, remaining, continues):
                order.append(key)
                await asyncio.sleep(run_s)

        short = asyncio.ensure_future(unit("S", 12, True, 0.03))  # the next S unit never comes
        await asyncio.sleep(0.001)
        long_unit = asyncio.ensure_future(unit("L", 300))
        await short
        assert gate.reserved_for == "S" and not gate.held
        if newcomer is not None:
            await unit(*newcomer)  # goes before S's would: taken at once
        await long_unit  # at the latest when the window (30 ms) closes
        assert gate.reserved_for is None and not gate.held
        return order

    assert asyncio.run(asyncio.wait_for(scenario(None), 5)) == ["S", "L"]
    assert asyncio.run(asyncio.wait_for(scenario(("T", 3)), 5)) == ["S", "T", "L"]


@pytest.mark.parametrize("order", ["shortest_remaining", "round_robin", "fifo"])
def test_gate_hands_on_when_waiters_are_cancelled(order):
    """b is cancelled while it waits; c is cancelled after the gate was handed to it but before it ran: the gate
    must go on to d either way, and end free."""

    async def scenario() -> list[str]:
        gate, order_run, tasks = UnitQueue(order), [], {}
        release = asyncio.Event()

        async def unit(key: str, wait: asyncio.Event | None = None, after=None) -> None:
            async with gate.hold(key, 10):
                order_run.append(key)
                if wait is not None:
                    await wait.wait()
            if after is not None:
                after()  # runs right after the release, before the next holder is scheduled

        tasks["a"] = asyncio.ensure_future(unit("a", release, after=lambda: tasks["c"].cancel()))
        await asyncio.sleep(0)
        for key in "bcd":
            tasks[key] = asyncio.ensure_future(unit(key))
            await asyncio.sleep(0)
        assert gate.waiting == 3
        tasks["b"].cancel()
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert [type(o).__name__ for o in outcomes] == ["NoneType", "CancelledError", "CancelledError", "NoneType"]
        assert not gate.held and gate.waiting == 0
        return order_run

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == ["a", "d"]
