"""Exponential backoff for the node's calls: base * factor^n, capped, with full jitter (Brooker 2015,
"Exponential Backoff And Jitter": many nodes retrying after one outage do not retry in step).
Only failures a retry can fix are retried (RouteError.kind "retryable")."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from xrayops.route.errors import RouteError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # calls in all, the first included
    base_seconds: float = 1.0
    max_seconds: float = 60.0
    factor: float = 2.0

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number `retry` (1-based)."""
        return min(self.max_seconds, self.base_seconds * self.factor ** (retry - 1))

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(retry))


def with_retries(
    call: Callable[[], T], policy: RetryPolicy, on_retry: Callable[[RouteError, int, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
) -> tuple[T, int]:
    """`call()` until it succeeds, fails for a reason a retry cannot fix, or the attempts are spent;
    returns (result, attempts used). The last RouteError is raised with `attempts` set on it."""
    rng = rng or random.Random()
    attempt = 1
    while True:
        try:
            return call(), attempt
        except RouteError as exc:
            exc.attempts = attempt
            if not exc.retryable or attempt >= policy.attempts:
                raise
            wait = policy.delay(attempt, rng)
            if on_retry is not None:
                on_retry(exc, attempt, wait)
            sleep(wait)
            attempt += 1
