"""The issuance chain's steps: each one's name (its task's, ``certman.issue.<name>``, and the
attempt rows'), the order step it runs at, and whether the order's in-flight slot is free once
it has run. Read by the steps (:mod:`pipeline.issuance`) and by the reports."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.models.order import OrderStep


@dataclass(frozen=True)
class Step:
    """One step of the chain: its name (the task's, and the attempt rows'), the order step it
    runs at, and whether the order's in-flight slot is free once it has run."""

    name: str
    at: OrderStep
    ends_order: bool = False


STEPS: tuple[Step, ...] = (
    Step("place_order", OrderStep.QUEUED),
    Step("publish_challenges", OrderStep.PLACED),
    Step("poll_validation", OrderStep.CHALLENGED),
    Step("finalise", OrderStep.READY),
    Step("encrypt_and_store", OrderStep.ISSUED, ends_order=True),
)
