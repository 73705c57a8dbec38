"""The live InferenceService, through the Kubernetes API (in-cluster config in a pod, else kubeconfig)."""
from __future__ import annotations

from xrayops.release.plan import ReleaseError

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
