"""Serving releases: registry versions published as immutable ensemble folders (local and S3 via
moto), the InferenceService pointed at them and back, the result valid against KServe's CRD."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest
import yaml
from typer.testing import CliRunner

from tests.crd_schemas import crd_validator
from tests.test_serving_support import make_bundle
from xrayops.bundle_meta import read_bundle_meta, verify_bundle
from xrayops.release import Release, ReleaseError, ReleaseMember, point_inference_service, release_models, roll_back
from xrayops.release.plan import (
    ANNOTATION_MODELS,
    ANNOTATION_PREVIOUS,
    ANNOTATION_RELEASE,
    member_of,
    plan_release,
    release_id,
)
from xrayops.release.storage import list_releases, open_store, read_release, verify_release
from xrayops.registry import register_bundle

REPO = Path(__file__).resolve().parents[1]
BASE_ISVC = REPO / "infra/k8s/base/serving/inferenceservice.yaml"


def said(res) -> str:
    return " ".join(res.output.split())  # the console wraps long errors


def base_isvc() -> dict:
    return yaml.safe_load(BASE_ISVC.read_text())


def crd_errors(isvc: dict) -> list[str]:
    validator = crd_validator("InferenceService", "serving.kserve.io", "v1beta1")
    return [e.message for e in validator.iter_errors(isvc)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow registry with a SimCLR and a BYOL member, a retrained SimCLR member, and a
    model on another preprocessing spec (cannot join the ensemble)."""
    root = tmp_path_factory.mktemp("release-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    bundles = {
        "simclr": make_bundle(root / "simclr", seed=0, ssl_method="simclr"),
        "byol": make_bundle(root / "byol", seed=1, ssl_method="byol"),
        "simclr2": make_bundle(root / "simclr2", seed=2, ssl_method="simclr"),
        "supcon64": make_bundle(root / "supcon64", seed=3, ssl_method="supcon", size=64),
    }
    refs = {key: register_bundle(path, uri, f"xr-{key}", alias="champion").model_uri for key, path in bundles.items()}
    return dict(uri=uri, bundles=bundles, refs=refs, metas={k: read_bundle_meta(p) for k, p in bundles.items()})


def test_a_release_is_named_by_its_members_weights(registry):
    metas = registry["metas"]
    a = member_of(metas["simclr"], "models:/x/1")
    b = member_of(metas["byol"], "models:/y/1")
    assert release_id([a, b]) == release_id([b, a])  # order does not matter
    assert release_id([a, b]) != release_id([member_of(metas["simclr2"], "models:/x/2"), b])
    assert release_id([a]).startswith("r-") and len(release_id([a])) == 14


def test_a_retrained_member_replaces_its_method_and_the_others_stay(registry):
    metas = registry["metas"]
    live = plan_release([(member_of(metas["simclr"], "models:/s/1"), metas["simclr"]),
                         (member_of(metas["byol"], "models:/b/1"), metas["byol"])], None, storage_uri="s3://m/region")
    new = plan_release([(member_of(metas["simclr2"], "models:/s/2"), metas["simclr2"])], live,
                       {"simclr": metas["simclr"], "byol": metas["byol"]})
    assert {m.member: m.model_uri for m in new.members} == {"byol": "models:/b/1", "simclr": "models:/s/2"}
    assert new.previous == live.release_id and new.storage_uri == "s3://m/region"
    assert new.release_id != live.release_id
    only = plan_release([(member_of(metas["simclr2"], "models:/s/2"), metas["simclr2"])], live, {}, replace_all=True)
    assert [m.member for m in only.members] == ["simclr"]


def test_members_that_cannot_make_one_ensemble_are_refused(registry):
    metas = registry["metas"]
    with pytest.raises(ReleaseError, match="two models for the same member 'simclr'"):
        plan_release([(member_of(metas["simclr"], "a"), metas["simclr"]),
                      (member_of(metas["simclr2"], "b"), metas["simclr2"])], None, storage_uri="/s")
    with pytest.raises(ReleaseError, match="do not make one ensemble.*preprocessing"):
        plan_release([(member_of(metas["simclr"], "a"), metas["simclr"]),
                      (member_of(metas["supcon64"], "b"), metas["supcon64"])], None, storage_uri="/s")
    with pytest.raises(ReleaseError, match="nothing to release"):
        plan_release([], None, storage_uri="/s")
    with pytest.raises(ReleaseError, match="no weights sha256"):
        member_of(metas["simclr"].model_copy(update={"weights_sha256": ""}), "a")


def test_the_inference_service_is_pointed_at_the_release(registry):
    metas = registry["metas"]
    release = plan_release([(member_of(metas["simclr"], "models:/s/1"), metas["simclr"]),
                            (member_of(metas["byol"], "models:/b/1"), metas["byol"])], None,
                           storage_uri="s3://xrayops-models/region")
    isvc = base_isvc()
    rolled = point_inference_service(isvc, release)
    model = rolled["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"s3://xrayops-models/region/releases/{release.release_id}"
    assert model["args"] == ["--bundle=/mnt/models/byol", "--bundle=/mnt/models/simclr"]
    (transformer,) = rolled["spec"]["transformer"]["containers"]
    # the subcommand stays first; the transformer reads the preprocessing spec of one member
    assert transformer["args"] == ["serve", "--role=transformer", "--bundle=/mnt/models/byol", "--host=0.0.0.0",
                                   "--predictor-protocol=v2"]
    env = {e["name"]: e.get("value") for e in transformer["env"]}
    assert env["STORAGE_URI"] == model["storageUri"] and env["XRAYOPS_SERVE_MAX_REQUEST_MB"] == "64"
    notes = rolled["metadata"]["annotations"]
    assert notes[ANNOTATION_RELEASE] == release.release_id and ANNOTATION_PREVIOUS not in notes
    assert notes[ANNOTATION_MODELS] == "models:/b/1,models:/s/1"
    assert notes["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert isvc == base_isvc()  # the input is not modified
    assert crd_errors(rolled) == []

    again = point_inference_service(rolled, release.model_copy(update={"release_id": "r-000000000001"}))
    assert again["metadata"]["annotations"][ANNOTATION_PREVIOUS] == release.release_id


def test_inference_services_it_cannot_point_are_refused():
    release = Release(release_id="r-1", storage_uri="/s", members=[
        ReleaseMember(member="simclr", model_uri="m", weights_sha256="a", ssl_method="simclr", arch="resnet18")])
    isvc = base_isvc()
    isvc["spec"]["predictor"]["model"]["args"] = ["--bundle", "/mnt/models/simclr"]
    with pytest.raises(ReleaseError, match="--bundle as a separate argument"):
        point_inference_service(isvc, release)
    with pytest.raises(ReleaseError, match="expected an InferenceService"):
        point_inference_service({"kind": "InferenceGraph"}, release)
    with pytest.raises(ReleaseError, match="no spec.predictor.model"):
        point_inference_service({"kind": "InferenceService", "spec": {"predictor": {}}}, release)


def test_publish_to_s3_then_retrain_then_roll_back(registry, s3_endpoint, tmp_path):
    """The whole cycle against a real S3 API (moto): a first two-member release, a retrained
    SimCLR member released over it (BYOL copied server-side), publishing again is a no-op, and a
    rollback points the service at the first release again."""
    endpoint, _ = s3_endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="xrayops-models")
    storage, refs, uri = "s3://xrayops-models/region", registry["refs"], registry["uri"]

    first = release_models([base_isvc()], [refs["simclr"], refs["byol"]], storage, uri, endpoint)
    assert first.previous is None and first.release.previous is None
    assert {m.member for m in first.release.members} == {"simclr", "byol"}
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="xrayops-models", Prefix="region/releases/")["Contents"]}
    rid = first.release.release_id
    assert keys == {f"region/releases/{rid}/{f}" for f in
                    ("release.json", "simclr/bundle.json", "simclr/weights.pt", "byol/bundle.json", "byol/weights.pt")}
    body = s3.get_object(Bucket="xrayops-models", Key=f"region/releases/{rid}/simclr/weights.pt")["Body"].read()
    assert body == (registry["bundles"]["simclr"] / "weights.pt").read_bytes()

    # The alias is pinned: the release names the version the alias pointed at.
    by_member = {m.member: m.model_uri for m in first.release.members}
    assert by_member == {"simclr": "models:/xr-simclr/1", "byol": "models:/xr-byol/1"}

    second = release_models(first.documents, [refs["simclr2"]], storage, uri, endpoint)
    assert second.previous == rid and second.release.previous == rid
    assert {m.member: m.model_uri for m in second.release.members} == {
        "simclr": "models:/xr-simclr2/1", "byol": "models:/xr-byol/1"}
    store = open_store(storage, endpoint)
    assert read_release(store, second.release.release_id) == second.release
    byol = s3.get_object(Bucket="xrayops-models",
                         Key=f"region/releases/{second.release.release_id}/byol/weights.pt")["Body"].read()
    assert byol == (registry["bundles"]["byol"] / "weights.pt").read_bytes()
    notes = second.inference_service["metadata"]["annotations"]
    assert (notes[ANNOTATION_RELEASE], notes[ANNOTATION_PREVIOUS]) == (second.release.release_id, rid)
    assert crd_errors(second.inference_service) == []

    # Same members again: the same release, nothing rewritten.
    before = s3.head_object(Bucket="xrayops-models", Key=f"region/releases/{rid}/release.json")["LastModified"]
    again = release_models([base_isvc()], [refs["simclr"], refs["byol"]], storage, uri, endpoint)
    assert again.release == first.release
    assert s3.head_object(Bucket="xrayops-models", Key=f"region/releases/{rid}/release.json")["LastModified"] == before

    # A bucket that does not exist is a clear error, not a traceback from botocore.
    with pytest.raises(ReleaseError, match="S3 read of region/releases/.*xrayops-nobucket/region failed: NoSuchBucket"):
        release_models([base_isvc()], [refs["simclr"]], "s3://xrayops-nobucket/region", uri, endpoint)

    # The audit: every member's weights hashed in S3 against the release; a swapped file is named.
    assert verify_release(store, rid) == {"simclr": "ok", "byol": "ok"}
    s3.put_object(Bucket="xrayops-models", Key=f"region/releases/{rid}/byol/weights.pt", Body=b"not the weights")
    found = verify_release(store, rid)
    assert found["simclr"] == "ok" and found["byol"].startswith("weights sha256 ") and "released " in found["byol"]
    s3.upload_file(str(registry["bundles"]["byol"] / "weights.pt"), "xrayops-models",
                   f"region/releases/{rid}/byol/weights.pt")

    # Listing: both releases, oldest first; an unfinished publish (no release.json) is named apart.
    s3.put_object(Bucket="xrayops-models", Key="region/releases/r-unfinished00/simclr/bundle.json", Body=b"{}")
    listed, incomplete = list_releases(store)
    assert [r.release_id for r in listed] == [rid, second.release.release_id] and incomplete == ["r-unfinished00"]

    back = roll_back(second.documents, storage, endpoint)
    assert back.release == first.release
    assert back.inference_service["spec"]["predictor"]["model"]["storageUri"] == first.release.uri
    assert back.inference_service["metadata"]["annotations"][ANNOTATION_PREVIOUS] == second.release.release_id
    with pytest.raises(ReleaseError, match="no previous release"):
        roll_back(first.documents, storage, endpoint)


def test_a_released_folder_is_what_serving_loads(registry, tmp_path):
    """The storage initializer copies storageUri to /mnt/models: each member folder is a bundle
    whose weights pass serving's sha256 check, and the ensemble loads."""
    from serving.model import XrayModel

    storage = tmp_path / "store"
    out = release_models([base_isvc()], [registry["refs"]["simclr"], registry["refs"]["byol"]], str(storage),
                         registry["uri"])
    mnt = storage / "releases" / out.release.release_id
    args = out.inference_service["spec"]["predictor"]["model"]["args"]
    dirs = [mnt / a.split("/mnt/models/")[1] for a in args]
    for d in dirs:
        verify_bundle(d)
    model = XrayModel("xrayops-region", dirs, device="cpu", deid_key="k")
    assert model.load(), model.load_error
    assert [m.meta.ssl_method for m in model.members] == ["byol", "simclr"]
    assert model.release == out.release.release_id and model.bundle_info()["release"] == out.release.release_id
    model.stop()
    transformer_view = XrayModel("xrayops-region", dirs[:1], device="cpu", deid_key="k")  # one member's spec
    assert transformer_view.load() and transformer_view.release == out.release.release_id

    # A folder swapped for another model under the release's name is not served as the release.
    shutil.rmtree(mnt / "simclr")
    shutil.copytree(registry["bundles"]["simclr2"], mnt / "simclr")
    swapped = XrayModel("xrayops-region", dirs, device="cpu", deid_key="k")
    assert not swapped.load() and not swapped.ready
    assert f"simclr in {mnt} is not a member of release {out.release.release_id}" in swapped.load_error
    # Bundles outside a release serve as before, with no release named.
    plain = XrayModel("xrayops-region", [registry["bundles"]["byol"]], device="cpu", deid_key="k")
    assert plain.load() and plain.release == ""


def test_a_damaged_release_is_not_taken_for_a_good_one(registry, tmp_path):
    storage = tmp_path / "store"
    out = release_models([base_isvc()], [registry["refs"]["simclr"]], str(storage), registry["uri"])
    folder = storage / "releases" / out.release.release_id
    meta = json.loads((folder / "simclr" / "bundle.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (folder / "simclr" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ReleaseError, match="member simclr holds weights 000000000000"):
        release_models([base_isvc()], [registry["refs"]["simclr"]], str(storage), registry["uri"])
    (folder / "release.json").write_text("{not json")
    with pytest.raises(ReleaseError, match="bad release.json"):
        read_release(open_store(str(storage)), out.release.release_id)
    with pytest.raises(ReleaseError, match="unsupported serving storage"):
        open_store("gs://bucket/x")


def test_cli_publish_and_rollback_edit_a_manifest_keeping_its_comments(registry, tmp_path, monkeypatch):
    from xrayops.app.cli import app

    monkeypatch.setenv("XRAYOPS_MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("XRAYOPS_RELEASE_STORAGE_URI", str(tmp_path / "store"))
    manifest = tmp_path / "inferenceservice.yaml"
    manifest.write_text(BASE_ISVC.read_text())
    runner = CliRunner()
    res = runner.invoke(app, ["release", "publish", "--model", "models:/xr-simclr@champion",
                              "--model", "models:/xr-byol@champion", "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout[res.stdout.index("{"):])
    text = manifest.read_text()
    assert text.startswith("# The region model for hospital IT")  # comments kept
    assert "# carries the S3 credentials (storage initializer)" in text
    isvc = yaml.safe_load(text)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == first["uri"]
    assert crd_errors(isvc) == []

    res = runner.invoke(app, ["release", "publish", "--model", "models:/xr-simclr2/1", "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    second = json.loads(res.stdout[res.stdout.index("{"):])
    assert second["replaces"] == first["release"]["release_id"]

    res = runner.invoke(app, ["release", "show", "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout[res.stdout.index("{"):])
    assert shown["release"]["release_id"] == second["release"]["release_id"]
    assert shown["rollback_to"] == first["release"]["release_id"] and shown["inference_service"] == "xrayops-region"
    res = runner.invoke(app, ["release", "verify", second["release"]["release_id"]])
    assert res.exit_code == 0 and json.loads(res.stdout[res.stdout.index("{"):])["ok"] is True, res.output
    weights = tmp_path / "store" / "releases" / first["release"]["release_id"] / "byol" / "weights.pt"
    good = weights.read_bytes()
    weights.write_bytes(b"tampered")
    res = runner.invoke(app, ["release", "verify", first["release"]["release_id"]])
    verdict = json.loads(res.stdout[res.stdout.index("{"):])
    assert res.exit_code == 1 and verdict["ok"] is False and verdict["members"]["simclr"] == "ok"
    weights.write_bytes(good)
    res = runner.invoke(app, ["release", "verify", "r-000000000000"])
    assert res.exit_code == 2 and "is not in" in said(res)
    res = runner.invoke(app, ["release", "list"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout[res.stdout.index("{"):])
    assert [r["release_id"] for r in listed["releases"]] == [first["release"]["release_id"], second["release"]["release_id"]]
    assert listed["releases"][1]["members"]["simclr"] == "models:/xr-simclr2/1" and listed["incomplete"] == []

    res = runner.invoke(app, ["release", "rollback", "--manifest", str(manifest), "--out", str(tmp_path / "back.yaml")])
    assert res.exit_code == 0, res.output
    back = yaml.safe_load((tmp_path / "back.yaml").read_text())
    assert back["spec"]["predictor"]["model"]["storageUri"] == first["uri"]
    res = runner.invoke(app, ["release", "show", "--manifest", str(BASE_ISVC)])
    assert res.exit_code == 2 and "serves no release yet" in said(res)

    res = runner.invoke(app, ["release", "publish", "--model", "models:/xr-supcon64@champion", "--manifest", str(manifest)])
    assert res.exit_code == 2 and "do not make one ensemble" in said(res)
    res = runner.invoke(app, ["release", "publish", "--model", "models:/nope@champion", "--manifest", str(manifest)])
    assert res.exit_code == 2 and "cannot resolve models:/nope@champion" in said(res)
    res = runner.invoke(app, ["release", "rollback", "--manifest", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "not found" in said(res)


class FakeCustomObjects:
    """Stands in for kubernetes' CustomObjectsApi: records calls, answers or fails like the API server."""

    def __init__(self, isvc: dict, fail_status: int | None = None):
        self.isvc, self.fail_status, self.calls = isvc, fail_status, []

    def _maybe_fail(self):
        if self.fail_status:
            from kubernetes.client.exceptions import ApiException

            raise ApiException(status=self.fail_status, reason="Conflict" if self.fail_status == 409 else "Forbidden")

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", group, version, namespace, plural, name))
        self._maybe_fail()
        return self.isvc

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("replace", group, version, namespace, plural, name, body["metadata"].get("resourceVersion")))
        self._maybe_fail()
        return body


def test_the_live_service_is_replaced_at_the_version_it_was_read():
    from xrayops.release.cluster import get_inference_service, replace_inference_service

    isvc = base_isvc()
    isvc["metadata"].update(namespace="xrayops", resourceVersion="4711")
    isvc["status"] = {"url": "http://x"}
    api = FakeCustomObjects(isvc)
    live = get_inference_service("xrayops-region", "xrayops", api)
    release = Release(release_id="r-1", storage_uri="s3://m/r", members=[
        ReleaseMember(member="simclr", model_uri="m", weights_sha256="a", ssl_method="simclr", arch="resnet18")])
    rolled = point_inference_service(live, release)
    assert "status" not in rolled and rolled["metadata"]["resourceVersion"] == "4711"
    replace_inference_service(rolled, api)
    assert api.calls == [("get", "serving.kserve.io", "v1beta1", "xrayops", "inferenceservices", "xrayops-region"),
                         ("replace", "serving.kserve.io", "v1beta1", "xrayops", "inferenceservices", "xrayops-region",
                          "4711")]
    for status, message in ((409, "changed while the release was prepared"), (403, "not allowed"),
                            (404, "does not exist")):
        with pytest.raises(ReleaseError, match=message):
            replace_inference_service(rolled, FakeCustomObjects(isvc, status))


def test_cli_without_a_manifest_or_cluster_credentials_says_so(tmp_path, monkeypatch):
    from xrayops.app.cli import app

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(tmp_path / "outputs"))
    res = CliRunner().invoke(app, ["release", "rollback"])
    assert res.exit_code == 2 and "no Kubernetes credentials" in said(res)


def test_the_inference_graph_manifest_is_rolled_member_by_member(registry, tmp_path, monkeypatch):
    """serving/inferencegraph.yaml (members scaling apart): each member's own InferenceService reads its
    folder of the release, the combiner reads the whole release; the graph itself is untouched; every
    rolled InferenceService validates against KServe's CRD, and a member the release lacks is refused."""
    from xrayops.app.cli import app

    graph = REPO / "infra/k8s/components/inferencegraph/inferencegraph.yaml"
    manifest = tmp_path / "inferencegraph.yaml"
    manifest.write_text(graph.read_text())
    monkeypatch.setenv("XRAYOPS_MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("XRAYOPS_RELEASE_STORAGE_URI", str(tmp_path / "store"))
    runner = CliRunner()
    res = runner.invoke(app, ["release", "publish", "--model", "models:/xr-simclr@champion", "--manifest", str(manifest)])
    assert res.exit_code == 2 and "has no member 'byol', which xrayops-member-byol serves" in said(res)
    assert manifest.read_text() == graph.read_text()  # nothing written

    # a three-member release: a SupCon member on the same spec as the others
    supcon = make_bundle(tmp_path / "supcon", seed=4, ssl_method="supcon")
    res = runner.invoke(app, ["release", "publish", "--model", "models:/xr-simclr@champion", "--model",
                              "models:/xr-byol@champion", "--model", str(supcon), "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    uri = json.loads(res.stdout[res.stdout.index("{"):])["uri"]
    before, after = list(yaml.safe_load_all(graph.read_text())), list(yaml.safe_load_all(manifest.read_text()))
    assert [(d["kind"], d["metadata"]["name"]) for d in after] == [(d["kind"], d["metadata"]["name"]) for d in before]
    services = {d["metadata"]["name"]: d for d in after if d["kind"] == "InferenceService"}
    for member in ("simclr", "byol", "supcon"):
        model = services[f"xrayops-member-{member}"]["spec"]["predictor"]["model"]
        assert model["storageUri"] == f"{uri}/{member}" and model["args"] == ["--bundle=/mnt/models"]
        verify_bundle(Path(model["storageUri"]))  # the folder is that member's bundle
    combiner = services["xrayops-ensemble-combiner"]["spec"]["predictor"]["model"]
    assert combiner["storageUri"] == uri
    assert combiner["args"] == ["--role=combiner", "--bundle=/mnt/models/byol", "--bundle=/mnt/models/simclr",
                                "--bundle=/mnt/models/supcon"]
    assert [d for d in after if d["kind"] == "InferenceGraph"] == [d for d in before if d["kind"] == "InferenceGraph"]
    for service in services.values():
        assert crd_errors(service) == [], service["metadata"]["name"]
        assert service["metadata"]["annotations"][ANNOTATION_RELEASE] == Path(uri).name
    assert "# Ensemble members that scale apart" in manifest.read_text()  # comments kept


class FakeGraphApi(FakeCustomObjects):
    """No single-pod ensemble: the InferenceGraph variant's services, found by label."""

    def __init__(self, services: list[dict]):
        super().__init__(None)
        self.services = services

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        from kubernetes.client.exceptions import ApiException

        self.calls.append(("get", name))
        raise ApiException(status=404, reason="Not Found")

    def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector=""):
        self.calls.append(("list", label_selector))
        return {"items": [s for s in self.services if label_selector in s["metadata"].get("labels", {})]}


def test_a_live_graph_release_rolls_every_member_service_and_the_combiner():
    import yaml

    from xrayops.release.cluster import live_services, replace_services
    from xrayops.release.plan import point_manifest

    docs = [d for d in yaml.safe_load_all((REPO / "infra/k8s/components/inferencegraph/inferencegraph.yaml").read_text())
            if d and d["kind"] == "InferenceService"]
    for i, d in enumerate(docs):
        d["metadata"].update(namespace="xrayops", resourceVersion=str(100 + i))
    api = FakeGraphApi(docs)
    live = live_services("xrayops-region", "xrayops", api)
    assert sorted(d["metadata"]["name"] for d in live) == ["xrayops-ensemble-combiner", "xrayops-member-byol",
                                                           "xrayops-member-simclr", "xrayops-member-supcon"]
    release = Release(release_id="r-2", storage_uri="s3://m/r", members=[
        ReleaseMember(member=m, model_uri=f"models:/x-{m}/1", weights_sha256=m, ssl_method=m, arch="resnet18")
        for m in ("byol", "simclr", "supcon")])
    names = replace_services(point_manifest(live, release), api)
    assert sorted(names) == sorted(d["metadata"]["name"] for d in live)
    replaced = [c for c in api.calls if c[0] == "replace"]
    assert len(replaced) == 4 and {c[-1] for c in replaced} == {"100", "101", "102", "103"}  # each at its version
    with pytest.raises(ReleaseError, match="no InferenceGraph member"):
        live_services("xrayops-region", "xrayops", FakeGraphApi([]))


def test_rollback_to_serves_the_release_asked_for_not_the_recorded_previous(registry, tmp_path, monkeypatch):
    """Three releases in turn (A, B, C): the live C records B as previous. `rollback --to A` must
    serve A; a rollback that took the recorded previous release instead would serve B."""
    from xrayops.app.cli import app

    storage, refs, uri = str(tmp_path / "store"), registry["refs"], registry["uri"]
    a = release_models([base_isvc()], [refs["simclr"]], storage, uri)
    b = release_models(a.documents, [refs["byol"]], storage, uri, replace_all=True)
    c = release_models(b.documents, [refs["simclr2"]], storage, uri, replace_all=True)
    notes = c.inference_service["metadata"]["annotations"]
    assert notes[ANNOTATION_RELEASE] == c.release.release_id and notes[ANNOTATION_PREVIOUS] == b.release.release_id
    assert len({a.release.release_id, b.release.release_id, c.release.release_id}) == 3

    back = roll_back(c.documents, storage, to=a.release.release_id)
    assert back.release.release_id == a.release.release_id != b.release.release_id
    assert back.inference_service["spec"]["predictor"]["model"]["storageUri"] == a.release.uri
    assert back.inference_service["metadata"]["annotations"][ANNOTATION_RELEASE] == a.release.release_id
    assert back.inference_service["metadata"]["annotations"][ANNOTATION_PREVIOUS] == c.release.release_id
    assert back.previous == c.release.release_id
    assert roll_back(c.documents, storage).release.release_id == b.release.release_id  # without --to: the previous

    # The same through the CLI, on a manifest.
    from xrayops.release.manifest import write_manifest

    manifest = tmp_path / "isvc.yaml"
    write_manifest(c.documents, manifest)
    monkeypatch.setenv("XRAYOPS_RELEASE_STORAGE_URI", storage)
    monkeypatch.setenv("XRAYOPS_OUTPUT_DIR", str(tmp_path / "outputs"))
    res = CliRunner().invoke(app, ["release", "rollback", "--to", a.release.release_id, "--manifest", str(manifest)])
    assert res.exit_code == 0, res.output
    served = yaml.safe_load(manifest.read_text())
    assert served["metadata"]["annotations"][ANNOTATION_RELEASE] == a.release.release_id
    assert served["spec"]["predictor"]["model"]["storageUri"] == a.release.uri
    res = CliRunner().invoke(app, ["release", "rollback", "--to", a.release.release_id, "--manifest", str(manifest)])
    assert res.exit_code == 2 and "is already live" in said(res)
