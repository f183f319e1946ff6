"""The core's per-request deadlines (edge.exchange._Timers): a deadline noted without a loop
timer still fires once another is armed, or once it is committed."""

from __future__ import annotations

import asyncio

import pytest

from edge.exchange import _Timers


async def _fired(setup: str) -> tuple[str | None, bool]:
    """(which deadline cancelled the task, whether it had a loop timer before it waited)"""
    timers: _Timers | None = None
    had_timer = False

    async def request() -> None:
        nonlocal timers, had_timer
        timers = _Timers()
        if setup == "note_then_arm":
            timers.note("request", 0.05)  # nearer than the one armed next: it must still fire
            timers.arm("upstream", 30.0)
        elif setup == "note_then_commit":
            timers.note("request", 0.05)
            timers.commit()
        else:  # arm first, then note: noting with a timer in place arms
            timers.arm("upstream", 30.0)
            timers.note("request", 0.05)
        had_timer = timers._handle is not None
        await asyncio.Event().wait()  # only a deadline ends this

    task = asyncio.ensure_future(request())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)
    assert timers is not None
    fired = timers.fired
    timers.clear()
    return fired, had_timer


@pytest.mark.parametrize("setup", ["note_then_arm", "note_then_commit", "arm_then_note"])
def test_a_noted_deadline_fires_once_a_timer_is_armed(setup: str) -> None:
    fired, had_timer = asyncio.run(_fired(setup))
    assert had_timer
    assert fired == "request"


def test_a_noted_deadline_alone_makes_no_timer() -> None:
    async def note_only() -> tuple[bool, bool]:
        timers = _Timers()
        timers.note("request", 30.0)
        without = timers._handle is None
        timers.commit()
        with_commit = timers._handle is not None
        timers.clear()
        return without, with_commit

    assert asyncio.run(note_only()) == (True, True)
