"""The live InferenceServices a release rolls, through the Kubernetes API (in-cluster config in a
pod, else kubeconfig): the single-pod ensemble by name, or, where an overlay serves the
InferenceGraph variant instead, the graph's member services and its combiner (by label)."""
from __future__ import annotations

from xrayops.release.plan import MEMBER_LABEL, ReleaseError

COMBINER_LABEL = "xrayops.io/combiner"  # the graph's combiner service, which reads the whole release

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


def _api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError) as exc:
            raise ReleaseError(f"no Kubernetes credentials (neither in-cluster nor a kubeconfig): {exc}") from exc
    return client.CustomObjectsApi()


def _explain(exc, name: str, namespace: str) -> ReleaseError:
    if exc.status == 404:
        return ReleaseError(f"InferenceService {namespace}/{name} does not exist")
    if exc.status == 403:
        return ReleaseError(f"not allowed to read or update InferenceService {namespace}/{name} (RBAC): {exc.reason}")
    if exc.status == 409:
        return ReleaseError(f"InferenceService {namespace}/{name} changed while the release was prepared; run it again")
    return ReleaseError(f"Kubernetes API error on InferenceService {namespace}/{name}: {exc.status} {exc.reason}")


def get_inference_service(name: str, namespace: str, api=None) -> dict:
    from kubernetes.client.exceptions import ApiException

    api = api or _api()
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        raise _explain(exc, name, namespace) from exc


def replace_inference_service(isvc: dict, api=None) -> dict:
    """Replace with the resourceVersion it was read at: a concurrent change makes this fail (409)
    rather than be overwritten."""
    from kubernetes.client.exceptions import ApiException

    api = api or _api()
    meta = isvc["metadata"]
    try:
        return api.replace_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], isvc)
    except ApiException as exc:
        raise _explain(exc, meta["name"], meta["namespace"]) from exc


def list_inference_services(namespace: str, label_selector: str, api=None) -> list[dict]:
    from kubernetes.client.exceptions import ApiException

    api = api or _api()
    try:
        return list(api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                      label_selector=label_selector).get("items") or [])
    except ApiException as exc:
        raise _explain(exc, f"[{label_selector}]", namespace) from exc


def live_services(name: str, namespace: str, api=None) -> list[dict]:
    """What a release rolls on the cluster: the InferenceService `name`; where it does not exist and
    the InferenceGraph variant serves, every member service (label xrayops.io/member) and the
    combiner (label xrayops.io/combiner)."""
    from kubernetes.client.exceptions import ApiException

    api = api or _api()
    try:
        return [api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)]
    except ApiException as exc:
        if exc.status != 404:
            raise _explain(exc, name, namespace) from exc
    graph = list_inference_services(namespace, MEMBER_LABEL, api) + list_inference_services(namespace, COMBINER_LABEL, api)
    if not graph:
        raise ReleaseError(f"InferenceService {namespace}/{name} does not exist, and no InferenceGraph member "
                           f"services (label {MEMBER_LABEL}) do either")
    return graph


def replace_services(docs: list[dict], api=None) -> list[str]:
    """Every InferenceService of `docs` replaced (each at the version it was read); their names."""
    api = api or _api()
    services = [d for d in docs if d.get("kind", "InferenceService") == "InferenceService"]
    for isvc in services:
        replace_inference_service(isvc, api)
    return [isvc["metadata"]["name"] for isvc in services]
