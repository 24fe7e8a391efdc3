"""Bounded waiting: every wait in tfcluster names what it waits for and ends.

A check returns a value when the wait is over and None while it is not; the
wait backs off from ``interval`` up to ``max_interval`` and raises
``WaitTimeout`` naming the awaited thing (and the check's last complaint)
when ``timeout`` runs out. Clock and sleep are injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """The awaited condition did not hold within the time allowed."""


def wait_for(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout: float,
    interval: float = 0.05,
    max_interval: float = 1.0,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``check`` until it returns something other than None."""
    deadline = now() + timeout
    delay = interval
    while True:
        result = check()
        if result is not None:
            return result
        remaining = deadline - now()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        sleep(min(delay, remaining))
        delay = min(delay * 2, max_interval)
