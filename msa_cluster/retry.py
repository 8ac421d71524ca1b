"""One retry policy for the whole package: exponential backoff with a cap, optional jitter.

Used by the store's compare-and-swap commit loop and by the cluster backend while actors
restart. It has no dependencies, so every layer may import it (like `types.py`).

Example:
    >>> policy = Backoff(attempts=4, initial_s=0.1, max_s=0.3)
    >>> list(policy.delays())
    [0.1, 0.2, 0.3]
    >>> calls = []
    >>> def flaky():
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise TimeoutError("not yet")
    ...     return "ok"
    >>> retry(flaky, retry_on=(TimeoutError,), policy=Backoff(4, 0.0, 0.0))
    'ok'
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "retry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """`attempts` tries in all; between tries wait initial_s * multiplier**i, capped at max_s.

    jitter: each wait is scaled by a uniform factor in [1 - jitter, 1 + jitter], so that racing
    writers do not retry in lockstep.
    """

    attempts: int
    initial_s: float
    max_s: float
    multiplier: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_s < 0 or self.max_s < 0 or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid backoff {self}: attempts >= 1, delays >= 0, multiplier >= 1, 0 <= jitter < 1")

    def delays(self) -> Iterator[float]:
        """The attempts - 1 waits between tries."""
        for i in range(self.attempts - 1):
            delay = min(self.initial_s * self.multiplier**i, self.max_s)
            if self.jitter:
                delay *= random.uniform(1 - self.jitter, 1 + self.jitter)
            yield delay

    def total_s(self) -> float:
        """The longest the waits can add up to (with jitter at its maximum)."""
        return sum(min(self.initial_s * self.multiplier**i, self.max_s) for i in range(self.attempts - 1)) * (1 + self.jitter)


def retry(
    fn: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    policy: Backoff,
    on_retry: Callable[[int, BaseException], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn` until it returns, retrying the errors in `retry_on`; the last error propagates."""
    delays = policy.delays()
    attempt = 0
    while True:
        try:
            return fn()
        except retry_on as e:
            delay = next(delays, None)
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(attempt, e)
            attempt += 1
            sleep(delay)
