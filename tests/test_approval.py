"""Release approval (xrayops.release.approval): the hash-chained audit log detects a tampered,
removed or rewritten entry; decisions land on every member version in a real MLflow registry;
with approval required, publish refuses (CLI exit 3) until a person approved the release, and a
rejected release stays refused."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tests.test_release import BASE_ISVC, base_isvc, said
from tests.test_serving_support import make_bundle
from xrayops.registry import register_bundle
from xrayops.release import ReleaseError, release_models, roll_back
from xrayops.release.approval import (
    GENESIS,
    ApprovalError,
    approval_status,
    decide,
    entry_hash,
    read_entries,
    registry_problems,
    verify_chain,
)
from xrayops.release.plan import ANNOTATION_RELEASE
from xrayops.release.storage import open_store, read_release


@pytest.fixture
def published(tmp_path_factory):
    """A fresh registry: two registered members (SimCLR, BYOL) published as one release, and a
    retrained SimCLR as another (approval tags are per release id: each test starts undecided)."""
    root = tmp_path_factory.mktemp("approval")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    refs = {key: register_bundle(make_bundle(root / key, seed=seed, ssl_method=method), uri, f"ap-{key}",
                                 alias="champion").model_uri
            for key, seed, method in (("simclr", 0, "simclr"), ("byol", 1, "byol"), ("simclr2", 2, "simclr"))}
    storage = root / "store"
    first = release_models(None, [refs["simclr"], refs["byol"]], str(storage), uri).release
    second = release_models(None, [refs["simclr2"]], str(storage), uri).release
    return dict(uri=uri, refs=refs, storage=storage, first=first, second=second, root=root)


def test_decisions_chain_and_land_on_every_member(published, tmp_path):
    log = tmp_path / "audit.jsonl"
    uri, first, second = published["uri"], published["first"], published["second"]
    assert approval_status(uri, first).state == "awaiting approval"
    a = decide("approved", first, "Dr. A. Quality", "gate passed; subgroups fine", uri, log)
    b = decide("rejected", second, "Dr. A. Quality", "BYOL member missing", uri, log)
    record = tmp_path / "change_record.html"
    record.write_text("<html>evidence</html>")
    c = decide("approved", second, "Dr. B. Officer", "re-reviewed", uri, log, change_record=record)
    assert (a.seq, b.seq, c.seq) == (1, 2, 3) and a.prev_hash == GENESIS and b.prev_hash == a.hash
    assert c.prev_hash == b.hash and entry_hash(c) == c.hash and len(c.change_record_sha256) == 64
    report = verify_chain(log)
    assert report.ok and report.n_entries == 3 and report.head == c.hash
    status = approval_status(uri, first)
    assert status.state == "approved" and status.by == "Dr. A. Quality" and status.audit_hash == a.hash
    assert status.members == {"simclr": "approved", "byol": "approved"}
    # The latest decision wins: a later approval lifts the rejection.
    assert approval_status(uri, second).state == "approved" and approval_status(uri, second).by == "Dr. B. Officer"
    from mlflow import MlflowClient

    tags = MlflowClient(uri, uri).get_model_version("ap-byol", "1").tags
    assert tags[f"xrayops.release.{first.release_id}.decision"] == "approved"
    assert tags[f"xrayops.release.{first.release_id}.note"] == "gate passed; subgroups fine"
    releases = {first.release_id: first, second.release_id: second}
    assert registry_problems(uri, read_entries(log), releases) == []


def test_the_chain_detects_an_edited_removed_or_rewritten_entry(published, tmp_path):
    log = tmp_path / "audit.jsonl"
    uri, first, second = published["uri"], published["first"], published["second"]
    for who, release in (("Dr. A", first), ("Dr. B", second), ("Dr. C", first)):
        decide("approved", release, who, "ok", uri, log)
    good = log.read_text()
    lines = good.splitlines()

    edited = json.loads(lines[1])
    edited["by"] = "Dr. Mallory"  # the approver's name changed after the fact
    log.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    report = verify_chain(log)
    assert not report.ok and report.broken_line == 2 and "edited" in report.problem and report.n_entries == 1
    with pytest.raises(ApprovalError, match="broken at line 2"):
        decide("approved", first, "Dr. D", "ok", uri, log)  # nothing is appended to a broken chain
    assert log.read_text().count("\n") == 3

    log.write_text("\n".join([lines[0], lines[2]]) + "\n")  # an entry removed
    report = verify_chain(log)
    assert not report.ok and report.broken_line == 2 and "numbered 3, expected 2" in report.problem

    log.write_text(good + "{not json\n")
    assert verify_chain(log).broken_line == 4 and "not an audit entry" in verify_chain(log).problem

    # Rewritten from the start with fresh hashes: the chain is intact, the registry disagrees.
    entries = [json.loads(x) for x in lines]
    entries[1]["by"] = "Dr. Mallory"
    entries[2]["decision"] = "rejected"
    previous = GENESIS
    from xrayops.release.approval import AuditEntry

    rewritten = []
    for raw in entries:
        entry = AuditEntry.model_validate({**raw, "prev_hash": previous, "hash": ""})
        entry = entry.model_copy(update={"hash": entry_hash(entry)})
        rewritten.append(entry.model_dump_json())
        previous = entry.hash
    log.write_text("\n".join(rewritten) + "\n")
    assert verify_chain(log).ok
    problems = registry_problems(uri, read_entries(log), {first.release_id: first, second.release_id: second})
    assert problems and any("the log's entry 3 says rejected" in p for p in problems)


def test_cli_audit_exits_1_on_a_broken_chain(published, tmp_path, monkeypatch):
    from xrayops.app.cli import app

    monkeypatch.setenv("XRAYOPS_MLFLOW_TRACKING_URI", published["uri"])
    monkeypatch.setenv("XRAYOPS_RELEASE_STORAGE_URI", str(published["storage"]))
    monkeypatch.setenv("XRAYOPS_RELEASE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    runner = CliRunner()
    rid = published["first"].release_id
    res = runner.invoke(app, ["release", "approve", rid, "--by", "Dr. A", "--note", "evidence read"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["entry"]["seq"] == 1
    res = runner.invoke(app, ["release", "audit"])
    verdict = json.loads(res.stdout[res.stdout.index("{"):])
    assert res.exit_code == 0 and verdict["ok"] and verdict["n_entries"] == 1 and verdict["registry_checked"]
    text = (tmp_path / "audit.jsonl").read_text()
    (tmp_path / "audit.jsonl").write_text(text.replace("evidence read", "evidence skipped"))
    res = runner.invoke(app, ["release", "audit"])
    verdict = json.loads(res.stdout[res.stdout.index("{"):])
    assert res.exit_code == 1 and not verdict["ok"] and verdict["broken_line"] == 1
    res = runner.invoke(app, ["release", "approve", rid, "--by", " ", "--note", "x"])
    assert res.exit_code == 2 and "--by NAME" in said(res)
    res = runner.invoke(app, ["release", "reject", "r-000000000000", "--by", "Dr. A", "--note", "x"])
    assert res.exit_code == 2 and "is not in" in said(res)


def test_publish_refuses_an_unapproved_release(published, tmp_path, monkeypatch):
    """Approval required: the release is stored (so it can be recorded and approved) but the
    InferenceService is not pointed at it; once approved, publishing it again rolls the service."""
    from xrayops.app.cli import app

    uri, refs = published["uri"], published["refs"]
    storage = tmp_path / "store"
    with pytest.raises(ApprovalError, match="awaiting approval"):
        release_models([base_isvc()], [refs["simclr"], refs["byol"]], str(storage), uri, require_approval=True)
    (rid,) = [p.name for p in (storage / "releases").iterdir()]
    assert read_release(open_store(str(storage)), rid).release_id == rid  # stored, not served

    monkeypatch.setenv("XRAYOPS_MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XRAYOPS_RELEASE_STORAGE_URI", str(storage))
    monkeypatch.setenv("XRAYOPS_RELEASE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("XRAYOPS_RELEASE_REQUIRES_APPROVAL", "true")
    manifest = tmp_path / "inferenceservice.yaml"
    manifest.write_text(BASE_ISVC.read_text())
    runner = CliRunner()
    publish = ["release", "publish", "--model", refs["simclr"], "--model", refs["byol"], "--manifest", str(manifest)]
    res = runner.invoke(app, publish)
    assert res.exit_code == 3 and f"release {rid} is awaiting approval" in said(res)
    assert manifest.read_text() == BASE_ISVC.read_text()  # not served

    res = runner.invoke(app, ["release", "reject", rid, "--by", "Dr. Q", "--note", "wrist subgroup too small"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, publish)
    assert res.exit_code == 3 and "rejected by Dr. Q" in said(res) and "wrist subgroup too small" in said(res)

    res = runner.invoke(app, ["release", "approve", rid, "--by", "Dr. Q", "--note", "more wrists reviewed"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, publish)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(manifest.read_text())["metadata"]["annotations"][ANNOTATION_RELEASE] == rid

    # Without the setting nothing is asked (the default, and the demo's local loop).
    monkeypatch.setenv("XRAYOPS_RELEASE_REQUIRES_APPROVAL", "false")
    res = runner.invoke(app, ["release", "publish", "--model", refs["simclr2"], "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    # A rollback to the recorded previous release needs nothing; to any other release, an approval.
    docs = yaml.safe_load_all(manifest.read_text())
    back = roll_back(list(docs), str(storage), require_approval=True, tracking_uri=uri)
    assert back.release.release_id == rid
    other = release_models(None, [refs["simclr2"]], str(storage), uri, replace_all=True).release
    with pytest.raises(ApprovalError, match=f"release {other.release_id} is awaiting approval"):
        roll_back(back.documents, str(storage), to=other.release_id, require_approval=True, tracking_uri=uri)


def test_only_registry_versions_can_be_approved(published, tmp_path):
    storage = tmp_path / "store"
    folder = release_models(None, [str(make_bundle(tmp_path / "loose", seed=7))], str(storage), None).release
    with pytest.raises(ApprovalError, match="not a registry version"):
        decide("approved", folder, "Dr. A", "ok", published["uri"], tmp_path / "audit.jsonl")
    assert not (tmp_path / "audit.jsonl").exists()  # nothing written
    with pytest.raises(ApprovalError, match="--note"):
        decide("approved", published["first"], "Dr. A", "  ", published["uri"], tmp_path / "audit.jsonl")
    with pytest.raises(ReleaseError, match="not found"):
        decide("approved", published["first"], "Dr. A", "ok", published["uri"], tmp_path / "a.jsonl",
               change_record=tmp_path / "missing.html")


def test_the_cluster_overlays_require_approval(monkeypatch):
    """Both overlays set the switch in xrayops-config (every xrayops pod and the release step read
    it), and Settings parses the literal they set."""
    from pathlib import Path

    from xrayops.config import Settings

    overlays = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "overlays"
    found = {}
    for kustomization in sorted(overlays.glob("*/kustomization.yaml")):
        generators = yaml.safe_load(kustomization.read_text()).get("configMapGenerator") or []
        literals = next(g["literals"] for g in generators if g["name"] == "xrayops-config")
        found[kustomization.parent.name] = dict(item.split("=", 1) for item in literals).get(
            "XRAYOPS_RELEASE_REQUIRES_APPROVAL")
    assert found == {"gpu-cloud": "true", "local": "true"}
    monkeypatch.setenv("XRAYOPS_RELEASE_REQUIRES_APPROVAL", found["local"])
    assert Settings().release_requires_approval is True
    monkeypatch.delenv("XRAYOPS_RELEASE_REQUIRES_APPROVAL")
    assert Settings().release_requires_approval is False  # off by default: the demo and a laptop
