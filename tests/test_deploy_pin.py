"""`xrayops deploy pin`: image digests written into an overlay's kustomize `images:` (comments
kept), given by the user or resolved with `crane digest`, and into the Dockerfile's base image;
what stays unpinned is named, and `deploy apply` refuses it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xrayops import deploy

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
D1, D2, D3, D4, D5 = ("sha256:" + c * 64 for c in "12345")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


@pytest.fixture
def k8s(tmp_path) -> Path:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, symlinks=True)
    return copy


def _images(k8s: Path, overlay: str) -> dict[str, dict]:
    doc = yaml.safe_load((k8s / "overlays" / overlay / "kustomization.yaml").read_text())
    return {e["name"]: e for e in doc["images"]}


def test_pin_writes_given_digests_and_keeps_the_file(k8s):
    path = k8s / "overlays" / "gpu-cloud" / "kustomization.yaml"
    before = path.read_text()
    pinned, missing = deploy.pin_overlay(k8s, "gpu-cloud", {"ghcr.io/xrayops/xrayops": D1, "redis": D2})
    assert [(p.name, p.tag, p.digest) for p in pinned] == [
        ("ghcr.io/xrayops/xrayops", "0.1.0", D1), ("redis", "7.4.1-alpine", D2)]
    assert missing == ["postgres", "minio/mc"]
    images = _images(k8s, "gpu-cloud")
    assert images["ghcr.io/xrayops/xrayops"]["digest"] == D1 and images["redis"]["digest"] == D2
    assert images["postgres"]["digest"] == deploy.PLACEHOLDER_DIGEST
    after = path.read_text()
    # Only the two digests changed: comments, order and the other entries are as they were.
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines()) and len(changed) == 2
    assert all(b.strip().startswith("digest: sha256:") for _, b in changed)
    assert "# The CUDA build" not in before or "# The CUDA build" in after
    # The rendered overlay runs the pinned images.
    docs = deploy.parse_manifests(deploy.kustomize(k8s / "overlays" / "gpu-cloud"))
    unpinned = deploy.unpinned_images(docs)
    assert f"ghcr.io/xrayops/xrayops:0.1.0@{D1}" not in unpinned
    assert unpinned == sorted({f"postgres:16.4-bookworm@{deploy.PLACEHOLDER_DIGEST}",
                               f"minio/mc:RELEASE.2025-08-13T08-35-41Z@{deploy.PLACEHOLDER_DIGEST}"})


def test_pin_resolves_the_rest_with_crane(k8s, tmp_path, monkeypatch):
    """`--resolve` asks `crane digest NAME:TAG` for every image not given (a stand-in crane that
    answers from a table, as the registry would)."""
    table = {"postgres:16.4-bookworm": D3, "minio/mc:RELEASE.2025-08-13T08-35-41Z": D4,
             "redis:7.4.1-alpine": D5}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    crane = bin_dir / "crane"
    crane.write_text(f"#!{sys.executable}\nimport json, sys\ntable = json.loads({json.dumps(json.dumps(table))})\n"
                     "ref = sys.argv[2]\nif sys.argv[1] != 'digest' or ref not in table:\n"
                     "    sys.stderr.write(f'MANIFEST_UNKNOWN: {ref}\\n'); sys.exit(1)\nprint(table[ref])\n")
    crane.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pinned, missing = deploy.pin_overlay(k8s, "gpu-cloud", {"ghcr.io/xrayops/xrayops": D1}, resolve=True)
    assert missing == [] and {p.name: p.digest for p in pinned} == {
        "ghcr.io/xrayops/xrayops": D1, "postgres": D3, "redis": D5, "minio/mc": D4}
    docs = deploy.parse_manifests(deploy.kustomize(k8s / "overlays" / "gpu-cloud"))
    assert deploy.unpinned_images(docs) == []
    # An image the registry does not know is a clear error naming it.
    with pytest.raises(deploy.DeployError, match=r"crane digest ghcr.io/xrayops/xrayops:0.1.0 failed: MANIFEST_UNKNOWN"):
        deploy.pin_overlay(k8s, "gpu-cloud", {}, resolve=True)


def test_pin_refuses_bad_input(k8s, monkeypatch):
    with pytest.raises(deploy.DeployError, match="expected IMAGE=sha256:<64 hex digits>"):
        deploy.parse_digest_args(["redis=sha256:abc"])
    with pytest.raises(deploy.DeployError, match="expected IMAGE=sha256"):
        deploy.parse_digest_args(["redis"])
    with pytest.raises(deploy.DeployError, match=r"no images entry for nginx \(known: "):
        deploy.pin_overlay(k8s, "local", {"nginx": D1})
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(deploy.DeployError, match="'crane' not found on PATH"):
        deploy.pin_overlay(k8s, "local", {}, resolve=True)


def test_pin_dockerfile_base_image(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    shutil.copy(ROOT / "infra" / "Dockerfile", dockerfile)
    pin = deploy.pin_dockerfile(dockerfile, D2)
    assert (pin.name, pin.tag, pin.digest) == ("python", "3.11.14-slim-bookworm", D2)
    text = dockerfile.read_text()
    assert f"ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@{D2}\n\nFROM ${{PYTHON_IMAGE}} AS build" in text
    deploy.pin_dockerfile(dockerfile, D3)  # pinning again replaces the digest
    assert dockerfile.read_text() == text.replace(D2, D3)
    with pytest.raises(deploy.DeployError, match="give the base image's digest"):
        deploy.pin_dockerfile(dockerfile)


def test_cli_pin_then_apply_no_longer_refuses(k8s, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(tmp_path / "no-kubeconfig"), XRAYOPS_LOG_LEVEL="WARNING")
    cli = [sys.executable, "-m", "xrayops.app.cli", "deploy"]
    partial = subprocess.run(cli + ["pin", "--overlay", "local", "--k8s-dir", str(k8s), "--digest", f"redis={D1}"],
                             capture_output=True, text=True, env=env, cwd=ROOT)
    assert partial.returncode == 2 and "still unpinned in local: ghcr.io/xrayops/xrayops, postgres" in partial.stderr
    assert json.loads(partial.stdout)["pinned"] == [{"name": "redis", "tag": "7.4.1-alpine", "digest": D1}]
    dockerfile = tmp_path / "Dockerfile"
    shutil.copy(ROOT / "infra" / "Dockerfile", dockerfile)
    args = ["pin", "--overlay", "local", "--k8s-dir", str(k8s), "--dockerfile", str(dockerfile), "--base-digest", D5]
    for name, digest in (("ghcr.io/xrayops/xrayops", D2), ("postgres", D3), ("minio/minio", D4), ("minio/mc", D5)):
        args += ["--digest", f"{name}={digest}"]
    done = subprocess.run(cli + args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["unpinned"] == [] and report["base_image"]["digest"] == D5 and len(report["pinned"]) == 4
    apply = subprocess.run(cli + ["apply", "--overlay", "local", "--k8s-dir", str(k8s), "--dry-run"],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    assert apply.returncode == 2 and "not pinned" not in apply.stderr
    assert "no Kubernetes cluster reachable" in apply.stderr
