"""The core's per-request deadlines (edge.exchange._Timers), watched by one loop timer per loop
(edge.exchange._Deadlines): each request is cancelled by its own deadline, never early, whatever
the other requests armed, disarmed or finished meanwhile; and many requests make no loop timer
each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from edge.exchange import _Deadlines, _Timers

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def _run(factory: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


class _Request:
    """A stand-in for a proxied request's task: arms what it is told, then waits for ever (only
    a deadline ends it); notes which deadline cancelled it, and when."""

    def __init__(self, owner: _Deadlines, arms: list[tuple[str, float]], drop: tuple[str, ...]):
        self.owner = owner
        self.arms = arms
        self.drop = drop
        self.armed_at = 0.0
        self.ended_at = 0.0
        self.fired: str | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        timers = _Timers(self.owner)
        loop = asyncio.get_running_loop()
        self.armed_at = loop.time()
        for name, delay in self.arms:
            timers.arm(name, delay)
        for name in self.drop:
            timers.disarm(name)
        try:
            await asyncio.Event().wait()
        finally:
            self.ended_at = loop.time()
            self.fired = timers.fired
            timers.clear()


async def _deadlines_fire() -> list[tuple[str | None, float]]:
    owner = _Deadlines(asyncio.get_running_loop())
    # A's nearest deadline sets the loop timer (0.15); B's is nearer still (0.1) and moves it;
    # C's 0.05 is disarmed (the timer fires for nothing there and is armed again for what is
    # left); D's is cleared when D is cancelled by the test, before any of them is due.
    a = _Request(owner, [("request", 0.3), ("upstream", 0.15)], ())
    await asyncio.sleep(0)
    b = _Request(owner, [("request", 0.1)], ())
    c = _Request(owner, [("upstream", 0.05), ("body", 0.25)], ("upstream",))
    d = _Request(owner, [("upstream", 0.02)], ())
    await asyncio.sleep(0)
    d.task.cancel()
    done, pending = await asyncio.wait([a.task, b.task, c.task, d.task], timeout=10.0)
    assert not pending, "a deadline never fired"
    return [(r.fired, r.ended_at - r.armed_at) for r in (a, b, c, d)]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_each_request_is_cancelled_by_its_own_nearest_deadline(loop: str) -> None:
    (a, a_after), (b, b_after), (c, c_after), (d, _) = _run(LOOPS[loop], _deadlines_fire())
    assert (a, b, c, d) == ("upstream", "request", "body", None)
    # Never before its time (a loop timer may be up to a millisecond early: libuv's resolution).
    assert a_after >= 0.15 - 0.002
    assert b_after >= 0.1 - 0.002
    assert c_after >= 0.25 - 0.002
    assert b_after < a_after < c_after


async def _stale_timer() -> tuple[str | None, float]:
    owner = _Deadlines(asyncio.get_running_loop())
    loop = asyncio.get_running_loop()
    # A request finished long before its deadline leaves the loop timer where it was ...
    first = _Timers(owner)
    first.arm("upstream", 0.05)
    first.clear()
    # ... and one armed later, for later, is still cancelled at its own time.
    later = _Request(owner, [("request", 0.2)], ())
    await asyncio.wait([later.task], timeout=10.0)
    assert later.task.done(), "the later deadline never fired"
    assert loop.time() - later.armed_at >= 0.2 - 0.002
    return later.fired, later.ended_at - later.armed_at


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_finished_requests_timer_does_not_lose_the_next_deadline(loop: str) -> None:
    fired, after = _run(LOOPS[loop], _stale_timer())
    assert fired == "request"
    assert after >= 0.2 - 0.002


class _CountingLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, counting the timers made."""

    made = 0

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        self.made += 1
        return super().call_at(when, callback, *args, context=context)


def test_requests_in_turn_make_no_loop_timer_each() -> None:
    loop = _CountingLoop()

    async def many() -> int:
        owner = _Deadlines(asyncio.get_running_loop())
        for _ in range(1000):
            # What a proxied GET arms: the request's deadline, then the upstream's (nearer);
            # the upstream's is disarmed when its head arrives, all cleared at the end.
            timers = _Timers(owner)
            timers.arm("request", 300.0)
            timers.arm("upstream", 60.0)
            timers.arm("upstream", 60.0)  # re-armed per response chunk
            timers.disarm("upstream")
            timers.clear()
        return loop.made

    try:
        made = loop.run_until_complete(many())
    finally:
        loop.close()
    # The first request's two deadlines each moved the one timer nearer; nothing after did.
    assert made == 2
