"""Log lines an attacker can trigger at will, at most once per interval each.

A bad event in Redis or a failing loop repeats as fast as input arrives; one line a minute
with the number left out says the same without filling the disk.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, level: int, interval: float) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def log(self, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log now if the interval has passed (saying how many were left out); True if logged."""
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return False
        self._next = now + self._interval
        if self._suppressed:
            msg = f"{msg} ({self._suppressed} more like it not logged)"
            self._suppressed = 0
        self._logger.log(self._level, msg, *args, exc_info=exc_info)
        return True

    def exception(self, msg: str, *args: Any) -> bool:
        return self.log(msg, *args, exc_info=True)
