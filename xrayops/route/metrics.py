"""The node's Prometheus metrics, in a registry of its own (served at /metrics by xrayops.route.health)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RouteMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("xrayops_route_instances_received_total", "Instances received by C-STORE", registry=r)
        self.busy = Counter("xrayops_route_instances_busy_total",
                            "Instances refused with 'out of resources' because the node held its maximum", registry=r)
        self.studies = Counter("xrayops_route_studies_total", "Studies processed", ["outcome"], registry=r)
        self.answered = Counter("xrayops_route_images_answered_total", "Images the endpoint answered with a region",
                                registry=r)
        self.refused = Counter("xrayops_route_images_refused_total",
                               "Images the admission policy refused (answered not applicable)", ["reason"], registry=r)
        self.stored = Counter("xrayops_route_srs_stored_total", "Structured Reports stored to the PACS", registry=r)
        self.failed = Counter("xrayops_route_failures_total", "Items that failed for good (dead-lettered or refused)",
                              ["stage", "reason"], registry=r)
        self.retries = Counter("xrayops_route_retries_total", "Calls retried after a retryable failure", ["stage"],
                               registry=r)
        self.held = Gauge("xrayops_route_instances_held", "Instances held while their study is open", registry=r)
        self.queued = Gauge("xrayops_route_studies_queued", "Complete studies waiting for a worker", registry=r)
        self.seconds = Histogram("xrayops_route_study_seconds", "From a study's completion to its SRs stored",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
