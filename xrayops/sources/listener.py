"""A DICOM C-STORE SCP (pynetdicom) that lands every received instance for ingestion.

Modalities and PACS push to it (`xrayops listen --port 11112 --ae-title XRAYOPS --out LANDING`).
Every storage SOP class is accepted in every transfer syntax pynetdicom knows, compressed ones
included, because ingestion decodes them all; the instance is written as received (no decode, no
re-encode of its pixels) less its private tags and overlay groups (`xrayops.sources.landing_bytes`,
unless the site keeps them) to LANDING/<pseudonym>.dcm, atomically, mode 0600. Logs carry
pseudonyms only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from xrayops.dicom.deid import pseudonymize
from xrayops.logs import get_logger
from xrayops.sources import landing_bytes, landing_name, write_atomically

log = get_logger(__name__)

# C-STORE status codes (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def make_store_handler(landing_dir: Path, key: str | bytes, keep_private: bool = False):
    """The EVT_C_STORE handler: write the received instance to the landing folder."""
    landing_dir = Path(landing_dir)

    def handle_store(event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        if not sop_uid:
            log.warning("listen.rejected", reason="no Affected SOP Instance UID")
            return CANNOT_UNDERSTAND
        try:
            data = landing_bytes(event.encoded_dataset(include_meta=True), keep_private)  # pixels as sent
            write_atomically(landing_dir, landing_name(sop_uid, key), data)
        except OSError as exc:
            log.error("listen.write_failed", image_id=pseudonymize(sop_uid, key, "img-"), error=type(exc).__name__)
            return OUT_OF_RESOURCES
        log.info("listen.stored", image_id=pseudonymize(sop_uid, key, "img-"), bytes=len(data))
        return SUCCESS

    return handle_store


def make_ae(ae_title: str) -> AE:
    """An AE that accepts every storage SOP class in every transfer syntax, plus C-ECHO."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True  # a sender that addresses another AE title is refused
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0  # no limit: radiographs are tens of MB
    return ae


def listen(landing_dir: Path, port: int, ae_title: str, key: str | bytes, host: str = "127.0.0.1", block: bool = True,
           keep_private: bool = False):
    """Serve C-STORE on host:port until stopped. With block=False, returns the server (call .shutdown())."""
    landing_dir = Path(landing_dir)
    landing_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    handlers = [(evt.EVT_C_STORE, make_store_handler(landing_dir, key, keep_private))]
    log.info("listen.start", host=host, port=port, ae_title=ae_title, landing=str(landing_dir))
    return make_ae(ae_title).start_server((host, port), block=block, evt_handlers=handlers)
