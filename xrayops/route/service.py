"""`xrayops route` assembled from the settings: node, SCP, PACS store, dead letter, health server.

The endpoint client comes from the caller (the CLI passes serving.client.EndpointClient: the core
does not import the adapters).
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xrayops.errors import XrayopsError
from xrayops.logs import get_logger
from xrayops.route.deadletter import DeadLetter
from xrayops.route.health import start_health_server
from xrayops.route.node import Endpoint, NodeOptions, RouteNode
from xrayops.route.pacs import PacsStore
from xrayops.route.retry import RetryPolicy
from xrayops.route.scp import start_scp

log = get_logger(__name__)


class RouteConfigError(XrayopsError):
    pass


def route_token(settings) -> Callable[[], str] | None:
    """The endpoint's bearer token, as a function the client calls per request: XRAYOPS_ROUTE_TOKEN,
    or the file XRAYOPS_ROUTE_TOKEN_FILE names (a mounted Secret, or a projected ServiceAccount token
    that the kubelet rotates: read again on every call); None when neither is set. Never logged."""
    if settings.route_token is not None:
        fixed = _checked_token(settings.route_token.get_secret_value())
        return lambda: fixed
    if settings.route_token_file is None:
        return None
    path = Path(settings.route_token_file)

    def from_file() -> str:
        try:
            return _checked_token(path.read_text())
        except OSError as exc:
            raise RouteConfigError(f"cannot read the route token file {path}: {exc.strerror}") from exc

    from_file()  # refuse to start without a readable token
    return from_file


def _checked_token(text: str) -> str:
    token = text.strip()
    if not token or any(ch.isspace() for ch in token):
        raise RouteConfigError("the route token is empty or holds whitespace; set one token (XRAYOPS_ROUTE_TOKEN[_FILE])")
    return token


def node_options(settings) -> NodeOptions:
    return NodeOptions(
        quiet_seconds=settings.route_study_quiet_seconds, max_pending_instances=settings.route_max_pending_instances,
        max_pending_bytes=settings.route_max_pending_mb * 1024 * 1024,
        max_queued_studies=settings.route_max_queued_studies, workers=settings.route_workers,
        max_images_per_request=settings.route_max_images_per_request, sr_per=settings.route_sr_per,
        retry=RetryPolicy(settings.route_retry_attempts, settings.route_retry_base_seconds,
                          settings.route_retry_max_seconds),
    )  # fmt: skip


@dataclass
class RunningRoute:
    node: RouteNode
    scp: object
    health: object | None

    def stop(self) -> None:
        """No new associations; what was received is processed (or dead-lettered), then the health server goes."""
        self.scp.shutdown()
        self.node.stop()
        if self.health is not None:
            self.health.shutdown()
            self.health.server_close()
        log.info("route.stopped")


def start_route(settings, endpoint: Endpoint, key: bytes) -> RunningRoute:
    store = PacsStore(settings.route_pacs_host, settings.route_pacs_port, settings.route_pacs_ae_title,
                      settings.route_ae_title, timeout=min(settings.route_timeout_seconds, 60.0))  # fmt: skip
    node = RouteNode(endpoint, store, DeadLetter(settings.route_dead_letter_dir), key, node_options(settings))
    node.start()
    try:
        scp = start_scp(node, settings.route_host, settings.route_port, settings.route_ae_title,
                        settings.route_max_associations)  # fmt: skip
    except OSError:
        node.stop()
        raise
    health = None
    if settings.route_health_port:
        node_alive = node.health

        def health_body() -> dict:
            body = node_alive()
            body["scp"] = "listening" if getattr(scp, "socket", None) is not None else "stopped"
            return body

        health = start_health_server(settings.route_host, settings.route_health_port, health_body, node.metrics.registry)
    log.info("route.ready", port=settings.route_port, ae_title=settings.route_ae_title,
             pacs=f"{settings.route_pacs_ae_title}@{settings.route_pacs_host}:{settings.route_pacs_port}",
             health_port=settings.route_health_port, sr_per=settings.route_sr_per)  # fmt: skip
    return RunningRoute(node, scp, health)


def run_route(settings, endpoint: Endpoint, key: bytes) -> None:
    """Start, serve until SIGTERM or SIGINT, stop in order."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    running = start_route(settings, endpoint, key)
    try:
        stopping.wait()
    finally:
        running.stop()
