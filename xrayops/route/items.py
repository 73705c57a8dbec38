"""What moves through the node: received instances, studies, the endpoint's answers."""
from __future__ import annotations

from dataclasses import dataclass, field

from xrayops.contracts import InferenceResponse


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as the sender stored it: Part 10 bytes (PHI) and its pseudonym for the logs."""

    sop_instance_uid: str
    data: bytes = field(repr=False)
    image_id: str  # img- pseudonym


@dataclass
class Study:
    """The instances of one study received so far; complete after the quiet period."""

    study_instance_uid: str = field(repr=False)
    study_id: str  # stu- pseudonym: what logs, metrics and dead-letter folders name
    instances: list[ReceivedInstance] = field(default_factory=list)
    first_received: float = 0.0  # time.monotonic()
    last_received: float = 0.0


@dataclass(frozen=True)
class EndpointAnswer:
    """The endpoint's answer to one request: one response and one SR (Part 10) per image, in order."""

    responses: list[InferenceResponse]
    srs: list[bytes] = field(repr=False)
