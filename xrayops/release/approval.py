"""Approval of a serving release as a recorded act: who approved (or rejected) which release,
when, why, and on which evidence.

A decision is written twice:
- an append-only JSONL audit log where every entry carries the SHA-256 of the entry before it
  (a hash chain): editing, removing or reordering an entry breaks every later link, and
  `verify_chain` names the first broken line;
- MLflow registry tags on every member version (`xrayops.release.<release_id>.decision`, `.by`,
  `.at`, `.note`, `.audit_hash`), where the release step and `xrayops release publish` read it
  anywhere the registry is reachable. The tags hold the entry's hash, so a chain rewritten
  from the start (every hash recomputed) still disagrees with the registry (`registry_problems`).

The log is written first: a decision the registry shows always has its audit entry. With
XRAYOPS_RELEASE_REQUIRES_APPROVAL a release goes live only when every member version shows
"approved" for it (`require_approval`). This follows the FDA's guidance on predetermined change
control plans (a described modification protocol, evidence per change, traceable sign-off) and
the EU AI Act's record keeping for high-risk systems (Article 12).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from xrayops.logs import get_logger
from xrayops.release.plan import Release, ReleaseError

log = get_logger(__name__)

GENESIS = "0" * 64  # the `prev_hash` of the first entry
Decision = Literal["approved", "rejected"]
State = Literal["approved", "rejected", "awaiting approval"]
TAG_PREFIX = "xrayops.release"
_NOTE_LIMIT = 4000  # MLflow tag values hold 8,000 characters; a note is a paragraph, not a file


class ApprovalError(ReleaseError):
    """A release that may not go live (not approved: `release` names it), or an approval that
    cannot be recorded."""

    def __init__(self, message: str, release: Release | None = None):
        super().__init__(message)
        self.release = release


class AuditEntry(BaseModel):
    """One line of the release audit log."""

    seq: int  # 1, 2, ... in log order
    at: datetime
    decision: Decision
    release_id: str
    by: str
    note: str
    members: dict[str, str]  # member -> registry version (models:/NAME/VERSION)
    change_record_sha256: str = ""  # the change record the approver saw, when one was given
    prev_hash: str
    hash: str = ""


def entry_hash(entry: AuditEntry) -> str:
    """SHA-256 of the entry's canonical JSON (sorted keys, no spaces), `hash` left out."""
    payload = entry.model_dump(mode="json", exclude={"hash"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ChainReport(BaseModel):
    path: str
    ok: bool
    n_entries: int
    head: str  # hash of the last good entry (GENESIS for an empty log)
    broken_line: int | None = None  # 1-based line of the first problem
    problem: str = ""


def verify_chain(path: Path) -> ChainReport:
    """Check every line: parses, numbered in order, links to the previous entry's hash, and hashes
    to what it says. A missing log is an empty, intact chain."""
    path = Path(path)
    head, n = GENESIS, 0
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for number, line in enumerate(lines, start=1):
        def broken(problem: str) -> ChainReport:
            return ChainReport(path=str(path), ok=False, n_entries=n, head=head, broken_line=number, problem=problem)

        try:
            entry = AuditEntry.model_validate_json(line)
        except ValidationError as exc:
            return broken(f"not an audit entry: {exc.errors()[0]['msg'] if exc.errors() else exc}")
        if entry.seq != n + 1:
            return broken(f"entry numbered {entry.seq}, expected {n + 1} (an entry removed or reordered)")
        if entry.prev_hash != head:
            return broken(f"links to {entry.prev_hash[:12]}, but the entry before hashes to {head[:12]}")
        if entry_hash(entry) != entry.hash:
            return broken(f"content hashes to {entry_hash(entry)[:12]}, the entry records {entry.hash[:12]} (edited)")
        head, n = entry.hash, n + 1
    return ChainReport(path=str(path), ok=True, n_entries=n, head=head)


def read_entries(path: Path) -> list[AuditEntry]:
    """The entries of an intact log (ApprovalError naming the broken line otherwise)."""
    report = verify_chain(path)
    if not report.ok:
        raise ApprovalError(f"the release audit log {path} is broken at line {report.broken_line}: {report.problem}")
    lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []
    return [AuditEntry.model_validate_json(line) for line in lines]


@contextmanager
def _locked(path: Path):
    """One writer at a time (two approvers at once must not both link to the same entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_entry(path: Path, decision: Decision, release: Release, by: str, note: str,
                 change_record_sha256: str = "", now: datetime | None = None) -> AuditEntry:
    """Append a decision to the log, linked to the last entry; refuses to extend a broken chain."""
    path = Path(path)
    with _locked(path):
        report = verify_chain(path)
        if not report.ok:
            raise ApprovalError(f"the release audit log {path} is broken at line {report.broken_line} "
                                f"({report.problem}); nothing appended: restore it from a backup first")
        entry = AuditEntry(seq=report.n_entries + 1, at=now or datetime.now(timezone.utc), decision=decision,
                           release_id=release.release_id, by=by, note=note,
                           members={m.member: m.model_uri for m in release.members},
                           change_record_sha256=change_record_sha256, prev_hash=report.head)
        entry = entry.model_copy(update={"hash": entry_hash(entry)})
        with path.open("a", encoding="utf-8") as f:
            f.write(entry.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
    return entry


# --- the registry side ---


def _tag(release_id: str, field: str) -> str:
    return f"{TAG_PREFIX}.{release_id}.{field}"


def _member_versions(release: Release) -> list[tuple[str, str]]:
    """(registered model, version) of every member; members outside the registry cannot be approved."""
    from xrayops.registry import parse_model_ref

    versions = []
    for m in release.members:
        ref = parse_model_ref(m.model_uri) if m.model_uri.startswith("models:/") else None
        if ref is None or ref.version is None:
            raise ApprovalError(f"member {m.member} of release {release.release_id} is {m.model_uri}, not a registry "
                                "version (models:/NAME/VERSION): register it, then release the registered version")
        versions.append((ref.name, str(ref.version)))
    return versions


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def tag_members(tracking_uri: str, release: Release, entry: AuditEntry) -> None:
    client = _client(tracking_uri)
    tags = {"decision": entry.decision, "by": entry.by, "at": entry.at.isoformat(), "note": entry.note[:_NOTE_LIMIT],
            "audit_hash": entry.hash}
    for name, version in _member_versions(release):
        for field, value in tags.items():
            client.set_model_version_tag(name, version, _tag(release.release_id, field), value)


class ApprovalStatus(BaseModel):
    """What the registry says about one release."""

    release_id: str
    state: State
    by: str = ""
    at: str = ""
    note: str = ""
    audit_hash: str = ""
    members: dict[str, str] = Field(default_factory=dict)  # member -> that version's decision


def approval_status(tracking_uri: str, release: Release) -> ApprovalStatus:
    """Approved when every member version records "approved" for this release under one audit
    entry; rejected when any records "rejected"; else awaiting approval."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    per_member, details = {}, []
    for m, (name, version) in zip(release.members, _member_versions(release)):
        try:
            tags = client.get_model_version(name, version).tags
        except MlflowException as exc:
            raise ApprovalError(f"cannot read {m.model_uri} from the registry: {exc}") from exc
        decision = tags.get(_tag(release.release_id, "decision"), "")
        per_member[m.member] = decision or "none"
        details.append({k: tags.get(_tag(release.release_id, k), "") for k in ("by", "at", "note", "audit_hash")})
    decisions = set(per_member.values())
    hashes = {d["audit_hash"] for d in details}
    if "rejected" in decisions:
        state = "rejected"
    elif decisions == {"approved"} and len(hashes) == 1:
        state = "approved"
    else:
        state = "awaiting approval"
    latest = max(details, key=lambda d: d["at"]) if details else {}
    return ApprovalStatus(release_id=release.release_id, state=state, members=per_member,
                          **({k: latest[k] for k in ("by", "at", "note", "audit_hash")} if state != "awaiting approval" else {}))


def decide(decision: Decision, release: Release, by: str, note: str, tracking_uri: str, audit_log: Path,
           change_record: Path | None = None) -> AuditEntry:
    """Record a person's decision on `release`: the audit log entry, then the tags on every member
    version. `change_record` (the record they read) is hashed into the entry."""
    by, note = by.strip(), note.strip()
    if not by:
        raise ApprovalError("say who decides: --by NAME (a person, not a service account)")
    if not note:
        raise ApprovalError("give the reason with --note TEXT: the audit log keeps why, not only who")
    _member_versions(release)  # before anything is written
    digest = ""
    if change_record is not None:
        if not Path(change_record).is_file():
            raise ApprovalError(f"change record {change_record} not found")
        digest = hashlib.sha256(Path(change_record).read_bytes()).hexdigest()
    entry = append_entry(Path(audit_log), decision, release, by, note, digest)
    tag_members(tracking_uri, release, entry)
    log.info("release decision recorded", release=release.release_id, decision=decision, by=by, seq=entry.seq,
             hash=entry.hash[:12])
    return entry


def require_approval(tracking_uri: str, release: Release) -> ApprovalStatus:
    """The registry's approval of `release`, or ApprovalError saying what is missing and how to give it."""
    status = approval_status(tracking_uri, release)
    if status.state == "approved":
        return status
    if status.state == "rejected":
        raise ApprovalError(f"release {release.release_id} was rejected by {status.by} at {status.at}: {status.note}",
                            release)
    raise ApprovalError(
        f"release {release.release_id} is awaiting approval (XRAYOPS_RELEASE_REQUIRES_APPROVAL is on): it is published "
        f"to the serving storage but not served; `xrayops release record {release.release_id}` writes its change "
        f"record, `xrayops release approve {release.release_id} --by NAME --note TEXT` approves it", release)


def registry_problems(tracking_uri: str, entries: list[AuditEntry], releases: dict[str, Release]) -> list[str]:
    """Where the registry disagrees with the log: for each release's latest decision in the log,
    every member version must carry that decision and that entry's hash."""
    from mlflow.exceptions import MlflowException

    latest: dict[str, AuditEntry] = {}
    for entry in entries:
        latest[entry.release_id] = entry
    problems = []
    client = _client(tracking_uri)
    for rid, entry in latest.items():
        release = releases.get(rid)
        if release is None:
            problems.append(f"release {rid} (entry {entry.seq}) is not in the serving storage")
            continue
        for name, version in _member_versions(release):
            try:
                tags = client.get_model_version(name, version).tags
            except MlflowException as exc:
                problems.append(f"models:/{name}/{version} of {rid} cannot be read from the registry: {exc}")
                continue
            got = (tags.get(_tag(rid, "decision")), tags.get(_tag(rid, "audit_hash")))
            if got != (entry.decision, entry.hash):
                problems.append(f"models:/{name}/{version} records {got[0] or 'no decision'} "
                                f"({(got[1] or '')[:12]}) for {rid}; the log's entry {entry.seq} says {entry.decision} "
                                f"({entry.hash[:12]})")
    return problems
