"""Small evaluators of the two access layers the manifests declare, for the manifest tests:
Kubernetes NetworkPolicies (L3/L4, ingress and egress) and Istio AuthorizationPolicies (identity,
method, path). They follow the documented semantics of each, on the rendered documents."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

NAMESPACE = "xrayops"


# --- label selectors -------------------------------------------------------------------------


def matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions); {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# --- NetworkPolicy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels, namespace) or, with `ip`, an address outside the cluster's pods."""

    labels: dict = field(default_factory=dict, hash=False)
    namespace: str = NAMESPACE
    ip: str | None = None
    name: str = ""

    def __str__(self) -> str:
        return self.name or (self.ip or f"{self.namespace}/{self.labels}")


def _peer_matches(peer: dict, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False  # pods are matched by selectors here, never by an ipBlock
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if other.ip is not None:
        return False
    if "namespaceSelector" in peer:
        ns_ok = matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other.namespace})
    else:
        ns_ok = other.namespace == NAMESPACE
    return ns_ok and ("podSelector" not in peer or matches(peer["podSelector"], other.labels))


def _port_ok(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports)


def _direction_allows(docs, pod: Endpoint, other: Endpoint, port: int, protocol: str, direction: str) -> bool:
    """Whether `pod` (in xrayops) may send (Egress) to / receive (Ingress) from `other`."""
    policies = [
        d for d in docs if d["kind"] == "NetworkPolicy"
        and direction in d["spec"].get("policyTypes", ["Ingress"])
        and matches(d["spec"]["podSelector"], pod.labels)
    ]
    if not policies:
        return True
    key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for policy in policies:
        for rule in policy["spec"].get(key) or []:
            if _port_ok(rule, port, protocol) and any(
                    not peer or _peer_matches(peer, other) for peer in (rule.get(peers) or [{}])):
                return True
    return False


def network_allows(docs, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """A connection src -> dst:port passes the NetworkPolicies of namespace xrayops: src's egress
    (when src is one of its pods) and dst's ingress (when dst is)."""
    if src.ip is None and src.namespace == NAMESPACE and not _direction_allows(docs, src, dst, port, protocol, "Egress"):
        return False
    if dst.ip is None and dst.namespace == NAMESPACE and not _direction_allows(docs, dst, src, port, protocol, "Ingress"):
        return False
    return True


# --- Istio AuthorizationPolicy ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What an Istio sidecar knows of a request: the peer's mTLS principal, the JWT's request
    principal (ISSUER/SUBJECT), and the HTTP method, path and destination port."""

    principal: str | None
    request_principal: str | None = None
    method: str = "GET"
    path: str = "/"
    port: int = 8080


def _value_matches(pattern: str, value: str | None) -> bool:
    """Istio string matching: exact, prefix `abc*`, suffix `*abc`, or `*` (present)."""
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _field(values, value, negative: bool) -> bool:
    hit = any(_value_matches(str(p), value) for p in values)
    return not hit if negative else hit


def _source_matches(source: dict, req: Request) -> bool:
    checks = {"principals": req.principal, "requestPrincipals": req.request_principal}
    for name, value in checks.items():
        if name in source and not _field(source[name], value, False):
            return False
        neg = "not" + name[0].upper() + name[1:]
        if neg in source and not _field(source[neg], value, True):
            return False
    unsupported = set(source) - {"principals", "requestPrincipals", "notPrincipals", "notRequestPrincipals"}
    assert not unsupported, f"the evaluator does not model {unsupported}"
    return True


def _operation_matches(op: dict, req: Request) -> bool:
    checks = {"methods": req.method, "paths": req.path, "ports": str(req.port)}
    for name, value in checks.items():
        if name in op and not _field(op[name], value, False):
            return False
        neg = "not" + name[0].upper() + name[1:]
        if neg in op and not _field(op[neg], value, True):
            return False
    return True


def _condition_matches(cond: dict, req: Request) -> bool:
    value = {"source.principal": req.principal, "request.auth.principal": req.request_principal}[cond["key"]]
    if "values" in cond and not _field(cond["values"], value, False):
        return False
    if "notValues" in cond and not _field(cond["notValues"], value, True):
        return False
    return True


def _rule_matches(rule: dict, req: Request) -> bool:
    if "from" in rule and not any(_source_matches(f.get("source") or {}, req) for f in rule["from"]):
        return False
    if "to" in rule and not any(_operation_matches(t.get("operation") or {}, req) for t in rule["to"]):
        return False
    return all(_condition_matches(c, req) for c in rule.get("when") or [])


def mesh_allows(docs, workload_labels: dict, req: Request, namespace: str = NAMESPACE) -> bool:
    """Istio's decision for `req` at a workload: any matching DENY rule denies; then, if any ALLOW
    policy applies to the workload, one of its rules must match; else the request is allowed."""
    applicable = [
        d for d in docs if d["kind"] == "AuthorizationPolicy" and d["metadata"].get("namespace", namespace) == namespace
        and matches((d.get("spec") or {}).get("selector"), workload_labels)
    ]
    for policy in applicable:
        spec = policy.get("spec") or {}
        if spec.get("action") == "DENY" and any(_rule_matches(r, req) for r in spec.get("rules") or []):
            return False
    allows = [p for p in applicable if (p.get("spec") or {}).get("action", "ALLOW") == "ALLOW"]
    if not allows:
        return True
    return any(_rule_matches(r, req) for p in allows for r in (p.get("spec") or {}).get("rules") or [])
