"""C-STORE of the SRs to the PACS (pynetdicom SCU): one association per study's SRs.

Failures as StoreError: no association (refused, aborted, nobody listening: "pacs_unreachable",
retryable), no answer to a C-STORE ("pacs_no_response", retryable), "out of resources" (0xA7xx,
retryable), any other failure status ("pacs_refused", rejected: the PACS will not take it).
Resending is safe: the same answer has the same SR instance UID (xrayops.results.sr).
"""
from __future__ import annotations

import io

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from xrayops.route.errors import StoreError

WARNING_STATUSES = {0xB000, 0xB006, 0xB007}  # stored, with a coercion or elements discarded


class PacsStore:
    def __init__(self, host: str, port: int, ae_title: str, calling_ae_title: str, timeout: float = 30.0) -> None:
        self.host, self.port, self.ae_title, self.calling = host, port, ae_title, calling_ae_title
        self.timeout = timeout

    def __call__(self, srs: list[bytes]) -> None:
        datasets = [dcmread(io.BytesIO(s)) for s in srs]
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class in sorted({str(d.SOPClassUID) for d in datasets}):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise StoreError("retryable", "pacs_unreachable",
                             f"association with {self.ae_title} at {self.host}:{self.port} {how}")  # fmt: skip
        try:
            for i, ds in enumerate(datasets):
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    raise StoreError("retryable", "pacs_no_response", f"SR {i + 1} of {len(datasets)}: no C-STORE response")
                if code == 0 or code in WARNING_STATUSES:
                    continue
                if 0xA700 <= code <= 0xA7FF:
                    raise StoreError("retryable", "pacs_out_of_resources", f"C-STORE status 0x{code:04X}")
                raise StoreError("rejected", "pacs_refused", f"C-STORE status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
