"""Fetch instances from a DICOMweb server (QIDO-RS search, WADO-RS retrieve) into a landing folder.

Studies are found with QIDO-RS (all, or the given Study Instance UIDs), their instances listed
with QIDO-RS, and each instance not yet landed retrieved with WADO-RS in its stored transfer
syntax (`application/dicom; transfer-syntax=*`: no server-side transcoding, ingestion decodes
every syntax); private tags and overlay groups are dropped before the instance lands (see
xrayops.sources). A re-run skips instances already in the landing folder, so an interrupted fetch
carries on. A failing instance or study is counted with its reason and the fetch goes on.
"""
from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydantic import BaseModel
from pydicom.filewriter import dcmwrite

from xrayops.dicom.deid import pseudonymize
from xrayops.logs import get_logger
from xrayops.progress import track
from xrayops.sources import landing_name, strip_for_landing, write_atomically

log = get_logger(__name__)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)


class FetchSummary(BaseModel):
    """What one DICOMweb fetch did (counts only: no UIDs)."""

    url: str
    n_studies: int
    n_instances: int
    n_fetched: int
    n_skipped: int  # already landed by an earlier run
    failures: dict[str, int]  # reason -> instances (or studies)
    landing_dir: Path


def fetch_dicomweb(
    url: str,
    landing_dir: Path,
    key: str | bytes,
    study_uids: Iterable[str] = (),
    timeout: float = 60.0,
    headers: dict[str, str] | None = None,
    retries: int = 5,
    keep_private: bool = False,
) -> FetchSummary:
    """Land every instance of the matching studies in `landing_dir` (see module docstring)."""
    landing_dir = Path(landing_dir)
    landing_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    client = DICOMwebClient(url=url, timeout=timeout, headers=headers)
    # dicomweb-client retries busy/unavailable answers with exponential back-off
    client.set_http_retry_params(retry=retries > 1, max_attempts=max(1, retries))
    failures: Counter[str] = Counter()
    studies = list(study_uids) or _search_studies(client, failures)
    instances: list[tuple[str, str, str]] = []
    for study in studies:
        try:
            found = client.search_for_instances(study_instance_uid=study, get_remaining=True)
        except requests.RequestException as exc:
            failures[f"qido_failed:{_status(exc)}"] += 1
            log.warning("dicomweb.study_failed", study_id=pseudonymize(study, key, "stu-"), error=_status(exc))
            continue
        for item in found:
            uids = (_value(item, STUDY_UID) or study, _value(item, SERIES_UID), _value(item, SOP_UID))
            if all(uids):
                instances.append(uids)
            else:
                failures["qido_missing_uid"] += 1
    fetched = skipped = 0
    for study, series, sop in track(instances, "dicomweb", total=len(instances)):
        name = landing_name(sop, key)
        if (landing_dir / name).exists():
            skipped += 1
            continue
        try:
            ds = client.retrieve_instance(study, series, sop, media_types=ANY_TRANSFER_SYNTAX)
            if not keep_private:  # as the listener: no private tags, no overlays (xrayops.sources)
                strip_for_landing(ds)
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
        except requests.RequestException as exc:
            failures[f"wado_failed:{_status(exc)}"] += 1
            log.warning("dicomweb.instance_failed", image_id=pseudonymize(sop, key, "img-"), error=_status(exc))
            continue
        except Exception as exc:  # a malformed part or dataset: count it, fetch the rest
            failures["wado_unreadable"] += 1
            log.warning("dicomweb.instance_failed", image_id=pseudonymize(sop, key, "img-"), error=type(exc).__name__)
            continue
        write_atomically(landing_dir, name, buffer.getvalue())
        fetched += 1
    summary = FetchSummary(url=url, n_studies=len(studies), n_instances=len(instances), n_fetched=fetched,
                           n_skipped=skipped, failures=dict(sorted(failures.items())), landing_dir=landing_dir)  # fmt: skip
    log.info("dicomweb.done", studies=summary.n_studies, fetched=fetched, skipped=skipped, failures=summary.failures)
    return summary


def _search_studies(client: DICOMwebClient, failures: Counter[str]) -> list[str]:
    try:
        found = client.search_for_studies(get_remaining=True)
    except requests.RequestException as exc:
        failures[f"qido_failed:{_status(exc)}"] += 1
        return []
    return [uid for uid in (_value(item, STUDY_UID) for item in found) if uid]


def _value(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else ""


def _status(exc: requests.RequestException) -> str:
    response = getattr(exc, "response", None)
    return str(response.status_code) if response is not None else type(exc).__name__
