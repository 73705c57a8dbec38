"""Failures of the node's two calls, typed by what a retry can do about them.

`reason` is a code from a fixed vocabulary (logged, counted, in metric labels); `detail` is one line
for the dead-letter reason file only: it can quote what a server said about the data, so it never
goes to a log.
"""
from __future__ import annotations

from typing import Literal

from xrayops.errors import XrayopsError

# retryable: the same call may succeed later (connection refused, timeout, 5xx, busy);
# rejected: the data was refused (4xx on input); refused: the node is not allowed or misconfigured.
FailureKind = Literal["retryable", "rejected", "refused"]


class RouteError(XrayopsError):
    def __init__(self, kind: FailureKind, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({kind})")
        self.kind, self.reason, self.detail = kind, reason, detail

    @property
    def retryable(self) -> bool:
        return self.kind == "retryable"


class EndpointError(RouteError):
    """The endpoint did not answer a request with results."""


class StoreError(RouteError):
    """The PACS did not take the SRs."""
