"""HTTP /healthz (200 while the SCP and the workers run, else 503; JSON counts) and /metrics
(Prometheus text of the node's registry). Nothing else; no request is logged."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def start_health_server(host: str, port: int, health: Callable[[], dict], registry) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] == "/healthz":
                body = health()
                self._send(200 if body.get("status") == "ok" else 503, json.dumps(body).encode(), "application/json")
            elif self.path.split("?")[0] == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b'{"error": "not found: /healthz and /metrics are served"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:  # quiet: probes every few seconds
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="route-health", daemon=True).start()
    return server
