"""The node's C-STORE SCP (pynetdicom): the listener's AE (every storage class, every transfer
syntax, C-ECHO), at most `max_associations` at once, handing each instance to the node.

Statuses (PS3.4 B.2.3): 0x0000 held; 0xA700 out of resources when the node holds its maximum (the
sender retries later: backpressure, not loss); 0xC000 cannot understand for an instance without a
SOP Instance UID or a Study Instance UID (it could not be filed back into a study). Every refusal
is logged (pseudonyms, reason code) and counted.
"""
from __future__ import annotations

import io
from typing import Any

from pydicom import dcmread

from xrayops.dicom.decode import quiet_pydicom
from xrayops.dicom.deid import pseudonymize
from xrayops.logs import get_logger
from xrayops.route.node import RouteNode
from xrayops.sources.listener import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, make_ae

log = get_logger(__name__)


def make_route_handler(node: RouteNode):
    def handle_store(event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        if not sop_uid:
            node.metrics.failed.labels("receive", "no_sop_instance_uid").inc()
            log.warning("route.refused", reason="no_sop_instance_uid")
            return CANNOT_UNDERSTAND
        data = event.encoded_dataset(include_meta=True)  # as sent: nothing decoded, nothing re-encoded
        try:
            with quiet_pydicom():
                header = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            study_uid = str(header.get("StudyInstanceUID", "") or "").strip()
        except Exception as exc:  # pydicom raises many types on a corrupt header
            study_uid = ""
            log.warning("route.unreadable_header", image_id=pseudonymize(sop_uid, node.key, "img-"),
                        error=type(exc).__name__)  # fmt: skip
        if not study_uid:
            node.metrics.failed.labels("receive", "no_study_instance_uid").inc()
            log.warning("route.refused", image_id=pseudonymize(sop_uid, node.key, "img-"), reason="no_study_instance_uid")
            return CANNOT_UNDERSTAND
        return SUCCESS if node.receive(study_uid, sop_uid, data) else OUT_OF_RESOURCES

    return handle_store


def start_scp(node: RouteNode, host: str, port: int, ae_title: str, max_associations: int):
    """Serve C-STORE on host:port in the background; returns the pynetdicom server (.shutdown())."""
    from pynetdicom import evt

    ae = make_ae(ae_title)
    ae.maximum_associations = max_associations  # more are rejected (transient): the sender retries
    log.info("route.listen", host=host, port=port, ae_title=ae_title, max_associations=max_associations)
    return ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, make_route_handler(node))])
