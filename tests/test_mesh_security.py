"""The Istio mesh of each overlay: STRICT mutual TLS, JWTs of the site's identity provider, and
AuthorizationPolicies that let only named principals reach each service and method, evaluated
with Istio's semantics on the rendered manifests (tests/k8s_policies.py). The gateway serves the
site's hosts with its TLS certificate; the InferenceGraph variant is checked the same way."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.crd_schemas import crd_errors
from tests.k8s_policies import Request, mesh_allows
from xrayops import deploy

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("local", "gpu-cloud")
PLACEHOLDER = "SET-BY-SITE-IDENTITY"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


def _sa(name: str) -> str:
    return f"cluster.local/ns/xrayops/sa/{name}"


def _site(overlay: str) -> dict:
    return yaml.safe_load((K8S / "overlays" / overlay / "site-identity.yaml").read_text())["spec"]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    """kustomize output of each overlay (the compiled pipelines are not needed here)."""
    return {name: deploy.parse_manifests(deploy.kustomize(K8S / "overlays" / name)) for name in OVERLAYS}


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> list[dict]:
    """gpu-cloud with the InferenceGraph component switched on, as its kustomization says to."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, symlinks=True)
    kustomization = copy / "overlays" / "gpu-cloud" / "kustomization.yaml"
    text = kustomization.read_text()
    assert "  # - ../../components/inferencegraph\n" in text
    kustomization.write_text(text.replace("  # - ../../components/inferencegraph\n", "  - ../../components/inferencegraph\n"))
    return deploy.parse_manifests(deploy.kustomize(copy / "overlays" / "gpu-cloud"))


REGION_TRANSFORMER = {"serving.kserve.io/inferenceservice": "xrayops-region", "component": "transformer"}
REGION_PREDICTOR = {"serving.kserve.io/inferenceservice": "xrayops-region", "component": "predictor"}
MLFLOW = {"app.kubernetes.io/name": "mlflow"}
DASHBOARD = {"app.kubernetes.io/name": "evidently-ui"}
SINK = {"app.kubernetes.io/name": "xrayops-inference-log"}
POSTGRES = {"app.kubernetes.io/name": "mlflow-postgres"}
REDIS = {"app.kubernetes.io/name": "feast-redis"}
FEAST = {"app.kubernetes.io/name": "feast"}
MINIO = {"app.kubernetes.io/name": "minio"}
INFER = "/v2/models/xrayops-region/infer"


def test_every_istio_object_validates_strictly_against_the_istio_crds(manifests, graph):
    istio = [d for docs in [*manifests.values(), graph] for d in docs
             if d["apiVersion"].split("/")[0] in ("security.istio.io", "networking.istio.io")]
    assert {d["kind"] for d in istio} == {"PeerAuthentication", "RequestAuthentication", "AuthorizationPolicy",
                                          "Gateway", "VirtualService"}
    assert {d["apiVersion"] for d in istio} == {"security.istio.io/v1", "networking.istio.io/v1"}
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in istio for e in crd_errors(d)]
    assert errors == []


def test_mutual_tls_is_strict_for_the_whole_namespace(manifests):
    for docs in manifests.values():
        (peer,) = [d for d in docs if d["kind"] == "PeerAuthentication"]
        assert peer["spec"] == {"mtls": {"mode": "STRICT"}}  # no selector, no port left permissive


def test_site_identity_fills_every_placeholder_consistently(manifests):
    for overlay, docs in manifests.items():
        site = _site(overlay)
        assert PLACEHOLDER not in deploy.dump_manifests(docs), overlay
        issuer = site["jwt"]["issuer"]
        jwts = [d for d in docs if d["kind"] == "RequestAuthentication"]
        assert {d["metadata"]["name"] for d in jwts} == {"jwt-inference", "jwt-mlflow", "jwt-dashboard"}
        for ra in jwts:
            (rule,) = ra["spec"]["jwtRules"]
            assert (rule["issuer"], rule["jwksUri"], rule["audiences"]) == (issuer, site["jwt"]["jwksUri"], site["jwt"]["audiences"])
            assert rule["jwksUri"].startswith("https://") and ra["spec"]["selector"]["matchLabels"]
        # Every request principal an ALLOW names is a subject of that issuer, at a workload whose
        # sidecar validates that issuer's tokens.
        for policy in (d for d in docs if d["kind"] == "AuthorizationPolicy"):
            for rule in policy["spec"].get("rules") or []:
                for peer in rule.get("from") or []:
                    for p in peer["source"].get("requestPrincipals", []) + peer["source"].get("notRequestPrincipals", []):
                        assert p.startswith(issuer + "/") and len(p) > len(issuer) + 1, (overlay, policy["metadata"]["name"], p)
                        selector = policy["spec"]["selector"]["matchLabels"]
                        assert any(ra["spec"]["selector"]["matchLabels"] == selector for ra in jwts), policy["metadata"]["name"]
        assert deploy.open_authorization(docs) == []


def test_gateway_serves_the_site_hosts_over_tls_with_the_overlays_certificate(manifests):
    for overlay, docs in manifests.items():
        site = _site(overlay)
        (gateway,) = [d for d in docs if d["kind"] == "Gateway"]
        (server,) = gateway["spec"]["servers"]
        assert server["port"]["protocol"] == "HTTPS" and server["port"]["number"] == 443
        assert server["tls"]["mode"] == "SIMPLE" and server["tls"]["minProtocolVersion"] == "TLSV1_2"
        hosts = [site["hosts"][k] for k in ("inference", "registry", "dashboard")]
        assert server["hosts"] == hosts
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "VirtualService"}
        routes = {vs["spec"]["hosts"][0]: vs["spec"]["http"][0]["route"][0]["destination"]["host"] for vs in services.values()}
        assert routes == {
            hosts[0]: "xrayops-region-transformer.xrayops.svc.cluster.local",
            hosts[1]: "mlflow.xrayops.svc.cluster.local",
            hosts[2]: "evidently-ui.xrayops.svc.cluster.local",
        }
        assert all(vs["spec"]["gateways"] == [gateway["metadata"]["name"]] for vs in services.values())
        # The overlay's certificate (cert-manager, in istio-system where the gateway reads it)
        # covers exactly these hosts, in the Secret the gateway names.
        (cert,) = [d for d in deploy.parse_manifests(deploy.kustomize(K8S / "overlays" / overlay / "tls"))
                   if d["kind"] == "Certificate"]
        assert cert["metadata"]["namespace"] == "istio-system"
        assert cert["spec"]["dnsNames"] == hosts and cert["spec"]["secretName"] == server["tls"]["credentialName"]


def test_only_named_principals_reach_each_service_and_method(manifests):
    for overlay, docs in manifests.items():
        site = _site(overlay)
        gw = site["gatewayPrincipals"][0]
        client, reader, officer = site["inferenceClients"][0], site["registryReaders"][0], site["qualityOfficers"][0]
        stranger = site["jwt"]["issuer"] + "/someone-else"
        ok = lambda labels, **req: mesh_allows(docs, labels, Request(**req))  # noqa: E731

        # The DICOM endpoint: a named hospital client through the gateway, inference and metadata only.
        assert ok(REGION_TRANSFORMER, principal=gw, request_principal=client, method="POST", path=INFER)
        assert ok(REGION_TRANSFORMER, principal=gw, request_principal=client, method="POST",
                  path="/v1/models/xrayops-region:predict")
        assert ok(REGION_TRANSFORMER, principal=gw, request_principal=client, method="GET", path="/v2/health/ready")
        assert not ok(REGION_TRANSFORMER, principal=gw, request_principal=None, method="POST", path=INFER)
        assert not ok(REGION_TRANSFORMER, principal=gw, request_principal=stranger, method="POST", path=INFER)
        assert not ok(REGION_TRANSFORMER, principal=gw, request_principal=reader, method="POST", path=INFER)
        assert not ok(REGION_TRANSFORMER, principal=gw, request_principal=client, method="POST",
                      path="/v2/repository/models/xrayops-region/unload")
        assert not ok(REGION_TRANSFORMER, principal=_sa("xrayops-pipeline-runner"), method="POST", path=INFER)
        # The predictor: the transformer only; the payload logger's sink: the predictors only.
        assert ok(REGION_PREDICTOR, principal=_sa("xrayops-transformer"), method="POST", path=INFER)
        for other in (gw, _sa("xrayops-mlflow"), _sa("xrayops-predictor"), "cluster.local/ns/default/sa/default"):
            assert not ok(REGION_PREDICTOR, principal=other, request_principal=client, method="POST", path=INFER)
        assert ok(SINK, principal=_sa("xrayops-predictor"), method="POST", path="/")
        assert not ok(SINK, principal=_sa("xrayops-transformer"), method="POST", path="/")

        # MLflow: the pipeline runner writes (the @champion alias decides what is released);
        # named readers read through the gateway; nobody else.
        alias = "/api/2.0/mlflow/registered-models/alias"
        assert ok(MLFLOW, principal=_sa("xrayops-pipeline-runner"), method="POST", path=alias)
        assert ok(MLFLOW, principal=_sa("xrayops-pipeline-runner"), method="DELETE", path=alias)
        assert ok(MLFLOW, principal=gw, request_principal=reader, method="GET", path="/api/2.0/mlflow/registered-models/get")
        assert ok(MLFLOW, principal=gw, request_principal=reader, method="POST", path="/ajax-api/2.0/mlflow/runs/search")
        assert not ok(MLFLOW, principal=gw, request_principal=reader, method="POST", path=alias)
        assert not ok(MLFLOW, principal=gw, request_principal=reader, method="DELETE", path=alias)
        assert not ok(MLFLOW, principal=gw, request_principal=client, method="GET", path="/")
        assert not ok(MLFLOW, principal=gw, request_principal=None, method="GET", path="/")
        for other in ("xrayops-monitor", "xrayops-predictor", "xrayops-transformer", "xrayops-feast"):
            assert not ok(MLFLOW, principal=_sa(other), method="GET", path="/api/2.0/mlflow/registered-models/get")

        # The dashboard: quality officers, read only.
        assert ok(DASHBOARD, principal=gw, request_principal=officer, method="GET", path="/api/projects")
        assert not ok(DASHBOARD, principal=gw, request_principal=officer, method="POST", path="/api/projects")
        assert not ok(DASHBOARD, principal=gw, request_principal=reader, method="GET", path="/")
        assert not ok(DASHBOARD, principal=gw, request_principal=None, method="GET", path="/")
        assert not ok(DASHBOARD, principal=_sa("xrayops-pipeline-runner"), method="GET", path="/")

        # The stores, by identity (TCP).
        assert ok(POSTGRES, principal=_sa("xrayops-mlflow"), port=5432)
        assert ok(POSTGRES, principal=_sa("xrayops-backup"), port=5432)
        assert not ok(POSTGRES, principal=_sa("xrayops-feast"), port=5432)
        assert ok(REDIS, principal=_sa("xrayops-feast"), port=6379) and not ok(REDIS, principal=_sa("xrayops-mlflow"), port=6379)
        assert ok(FEAST, principal=_sa("xrayops-pipeline-runner"), method="POST", path="/get-online-features")
        assert not ok(FEAST, principal=_sa("xrayops-predictor"), method="POST", path="/get-online-features")
        # Anything else in the namespace: nobody (allow-nothing).
        assert not ok({"app": "something-new"}, principal=_sa("xrayops-pipeline-runner"))
        if overlay == "local":
            for client_sa in ("xrayops-pipeline-runner", "xrayops-mlflow", "xrayops-predictor", "xrayops-backup", "default-editor"):
                assert ok(MINIO, principal=_sa(client_sa), port=9000), client_sa
            assert not ok(MINIO, principal=_sa("xrayops-evidently"), port=9000)
            assert not ok(MINIO, principal=gw, request_principal=client, port=9000)


def test_guards_hold_against_a_namespace_wide_allow_added_by_another_controller(manifests):
    """Kubeflow's profile controller adds an ALLOW for the profile owner's gateway traffic to every
    workload of the namespace; the DENY guards keep the services to their named principals."""
    for overlay, docs in manifests.items():
        site = _site(overlay)
        gw = site["gatewayPrincipals"][0]
        owner_access = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "ns-owner-access-istio", "namespace": "xrayops"},
                        "spec": {"rules": [{"from": [{"source": {"principals": [gw]}}]}]}}
        widened = docs + [owner_access]
        assert mesh_allows(widened, {"app": "notebook"}, Request(principal=gw))  # the owner's own pods: open
        ok = lambda labels, **req: mesh_allows(widened, labels, Request(**req))  # noqa: E731
        assert not ok(REGION_TRANSFORMER, principal=gw, request_principal=None, method="POST", path=INFER)
        assert not ok(MLFLOW, principal=gw, request_principal=None, method="POST", path="/api/2.0/mlflow/registered-models/alias")
        assert not ok(MLFLOW, principal=gw, request_principal=site["registryReaders"][0], method="POST",
                      path="/api/2.0/mlflow/registered-models/alias")
        assert not ok(DASHBOARD, principal=gw, request_principal=None, method="GET", path="/")
        assert not ok(REGION_PREDICTOR, principal=gw, method="POST", path=INFER)
        assert not ok(POSTGRES, principal=gw, port=5432)


def test_a_rule_open_to_anyone_is_refused_before_anything_renders(tmp_path, manifests):
    """In Istio an empty principals list matches anyone: `deploy render` refuses an overlay with
    one, and kustomize already refuses a SiteIdentity whose list is empty."""
    docs = [dict(d) for d in manifests["local"]]
    (policy,) = [d for d in docs if d["kind"] == "AuthorizationPolicy" and d["metadata"]["name"] == "inference-clients"]
    emptied = yaml.safe_load(yaml.safe_dump(policy))
    emptied["spec"]["rules"][0]["from"][0]["source"]["requestPrincipals"] = []
    assert deploy.open_authorization([emptied]) == ["inference-clients: rules[0].from[0] has an empty requestPrincipals"]
    nobody = {"kind": "AuthorizationPolicy", "metadata": {"name": "p"}, "spec": {"rules": [{"from": [{"source": {}}]}]}}
    assert deploy.open_authorization([nobody]) == ["p: rules[0].from[0] names no caller"]
    guard = {"kind": "AuthorizationPolicy", "metadata": {"name": "g"},
             "spec": {"action": "DENY", "rules": [{"when": [{"key": "source.principal", "notValues": []}]}]}}
    assert deploy.open_authorization([guard]) == ["g: rules[0].when[0] (source.principal) has no values"]

    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, symlinks=True)
    policies = copy / "base" / "mesh" / "authorization-policies.yaml"
    policies.write_text(policies.read_text() + "---\n" + yaml.safe_dump(
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "too-open"},
         "spec": {"selector": {"matchLabels": {"app": "x"}}, "rules": [{"from": [{"source": {"principals": []}}]}]}}))
    with pytest.raises(deploy.DeployError, match=r"let anyone in.*too-open: rules\[0\]\.from\[0\] has an empty principals"):
        deploy.render(copy, "local", default_image="x:0")
    site = copy / "overlays" / "local" / "site-identity.yaml"
    doc = yaml.safe_load(site.read_text())
    doc["spec"]["inferenceClients"] = []
    site.write_text(yaml.safe_dump(doc))
    with pytest.raises(deploy.DeployError, match="spec.inferenceClients"):
        deploy.render(copy, "local", default_image="x:0")


def test_inferencegraph_variant_routes_and_admits_only_its_chain(graph):
    site = _site("gpu-cloud")
    gw, client = site["gatewayPrincipals"][0], site["inferenceClients"][0]
    assert PLACEHOLDER not in deploy.dump_manifests(graph) and deploy.open_authorization(graph) == []
    router = {"serving.kserve.io/inferencegraph": "xrayops-region-graph", "app": "xrayops-region-graph"}
    member_transformer = {"serving.kserve.io/inferenceservice": "xrayops-member-simclr", "component": "transformer",
                          "xrayops.io/graph-member": "true", "xrayops.io/egress-s3": "true"}
    member_predictor = {**member_transformer, "component": "predictor"}
    combiner = {"serving.kserve.io/inferenceservice": "xrayops-ensemble-combiner", "component": "predictor"}
    ok = lambda labels, **req: mesh_allows(graph, labels, Request(**req))  # noqa: E731
    assert ok(router, principal=gw, request_principal=client, method="POST", path="/")
    assert not ok(router, principal=gw, request_principal=None, method="POST", path="/")
    member_path = "/v1/models/xrayops-member-simclr:predict"
    assert ok(member_transformer, principal=_sa("xrayops-graph-router"), method="POST", path=member_path)
    assert not ok(member_transformer, principal=gw, request_principal=client, method="POST", path=member_path)
    assert ok(member_predictor, principal=_sa("xrayops-transformer"), method="POST", path="/v2/models/x/infer")
    assert not ok(member_predictor, principal=_sa("xrayops-graph-router"), method="POST", path="/v2/models/x/infer")
    assert ok(combiner, principal=_sa("xrayops-graph-router"), method="POST", path="/v1/models/xrayops-ensemble-combiner:predict")
    assert not ok(combiner, principal=_sa("xrayops-transformer"), method="POST", path="/v1/models/x:predict")
    # The hospital's clients reach the router: the inference host routes there, with its JWT checked.
    (vs,) = [d for d in graph if d["kind"] == "VirtualService" and d["metadata"]["name"] == "xrayops-inference"]
    assert vs["spec"]["http"][0]["route"][0]["destination"]["host"] == "xrayops-region-graph.xrayops.svc.cluster.local"
    (jwt,) = [d for d in graph if d["kind"] == "RequestAuthentication" and d["metadata"]["name"] == "jwt-graph"]
    assert jwt["spec"]["jwtRules"][0]["issuer"] == site["jwt"]["issuer"]
    assert jwt["spec"]["selector"]["matchLabels"].items() <= router.items()
    # One serving variant: no single-pod ensemble, nor its mesh rules, beside the graph.
    names = {(d["kind"], d["metadata"]["name"]) for d in graph}
    assert ("InferenceService", "xrayops-region") not in names and ("InferenceGraph", "xrayops-region-graph") in names
    assert not {("AuthorizationPolicy", "inference-clients"), ("RequestAuthentication", "jwt-inference")} & names
    # The release role covers the services a graph release rolls, and nothing else of KServe's.
    (role,) = [d for d in graph if d["kind"] == "Role" and d["metadata"]["name"] == "xrayops-pipeline-runner"]
    kserve, listing = [r for r in role["rules"] if r["apiGroups"] == ["serving.kserve.io"]]
    # A live graph release finds its services by label: list, which no name can narrow, and no write.
    assert listing == {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["list"]}
    services = {d["metadata"]["name"] for d in graph if d["kind"] == "InferenceService"}
    assert set(kserve["resourceNames"]) == services and kserve["verbs"] == ["get", "update"]
    # No idle GPU: each member's predictor holds one, the combiner and transformers none.
    gpus = {d["metadata"]["name"] for d in graph if d["kind"] == "InferenceService"
            and "nvidia.com/gpu" in d["spec"]["predictor"]["model"]["resources"]["limits"]}
    assert gpus == {"xrayops-member-simclr", "xrayops-member-byol", "xrayops-member-supcon"}
