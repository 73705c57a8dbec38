"""What keeps failing is kept, with its reason: never dropped silently.

One folder per item, `<UTC time>-<stu- pseudonym>-<stage>[-<img- pseudonym>]`, holding `reason.json`
(stage, reason code, kind, attempts, the detail line, the pseudonyms) and the data to replay:
`instances/img-….dcm` (the instances as received, when the endpoint failed) or `srs/sr-….dcm` (the
Structured Reports, when the PACS did). Names carry pseudonyms only; the files are PHI and are
created owner-only (0700 folders, 0600 files), the folder appears whole (written aside, renamed).
Replaying is sending `instances/` to the node again (storescu +sd), or `srs/` to the PACS.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from xrayops.results.files import sr_file_name
from xrayops.route.items import ReceivedInstance

Stage = Literal["endpoint", "sr", "store", "shutdown"]
REASON_FILE = "reason.json"


class DeadLetterReason(BaseModel):
    study_id: str
    image_ids: list[str]
    stage: Stage
    reason: str  # a code: endpoint_rejected, endpoint_unreachable, pacs_unreachable, ...
    kind: str  # retryable (and the attempts ran out), rejected, refused
    attempts: int
    detail: str = ""  # one line about the data (can quote a server's message): this file only, never a log
    at: datetime


class DeadLetter:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def put(
        self, study_id: str, stage: Stage, reason: str, kind: str, attempts: int, detail: str = "",
        instances: Sequence[ReceivedInstance] = (), srs: Sequence[bytes] = (), image_id: str = "",
    ) -> Path:
        """Keep one failed item (a study, or one image of it); returns its folder."""
        at = datetime.now(timezone.utc)
        name = f"{at:%Y%m%dT%H%M%S%fZ}-{study_id}-{stage}" + (f"-{image_id}" if image_id else "")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        aside = self.folder / ".incoming" / uuid.uuid4().hex
        aside.mkdir(mode=0o700, parents=True)
        record = DeadLetterReason(
            study_id=study_id, image_ids=[i.image_id for i in instances] or ([image_id] if image_id else []),
            stage=stage, reason=reason, kind=kind, attempts=attempts, detail=" ".join(detail.split())[:500], at=at,
        )
        _write(aside / REASON_FILE, record.model_dump_json(indent=2).encode())
        for folder, files in (("instances", [(f"{i.image_id}.dcm", i.data) for i in instances]),
                              ("srs", [(sr_file_name(s), s) for s in srs])):  # fmt: skip
            if files:
                (aside / folder).mkdir(mode=0o700)
                for file_name, data in files:
                    _write(aside / folder / file_name, data)
        target = self.folder / name
        os.replace(aside, target)
        return target

    def items(self) -> list[tuple[Path, DeadLetterReason]]:
        """Every kept item with its reason, oldest first."""
        out = []
        for path in sorted(p for p in self.folder.glob("*") if p.is_dir() and not p.name.startswith(".")):
            out.append((path, DeadLetterReason.model_validate(json.loads((path / REASON_FILE).read_text()))))
        return out


def _write(path: Path, data: bytes) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(data)
