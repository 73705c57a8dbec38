"""The Kubernetes manifests: render, apply, pin images by digest."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from xrayops.app.cli.common import deploy_app, _fail, _print_json, ImageOption, K8sDirOption, OverlayOption
from xrayops.config import get_settings


def _render_manifests(overlay: str, k8s_dir: Path, image: Optional[str]) -> str:
    from xrayops.deploy import DeployError, render

    try:
        return render(k8s_dir, overlay, default_image=get_settings().image, image=image)
    except DeployError as exc:
        _fail(str(exc))


@deploy_app.command("render")
def deploy_render(
    overlay: OverlayOption,
    k8s_dir: K8sDirOption = Path("infra/k8s"),
    image: ImageOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the manifests here instead of stdout.")] = None,
) -> None:
    """Print the full manifests: `kubectl kustomize` of the overlay plus the compiled pipeline (ConfigMap xrayops-pipeline)."""
    manifests = _render_manifests(overlay, k8s_dir, image)
    if out is None:
        typer.echo(manifests, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(manifests)
        typer.echo(str(out))


@deploy_app.command("apply")
def deploy_apply(
    overlay: OverlayOption,
    k8s_dir: K8sDirOption = Path("infra/k8s"),
    image: ImageOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="kubectl's client-side dry run: validate, change nothing.")] = False,
    server_dry_run: Annotated[bool, typer.Option("--server-dry-run", help="Server-side dry run (admission included).")] = False,
    allow_unpinned: Annotated[bool, typer.Option("--allow-unpinned", help="Apply images without a digest (development clusters only).")] = False,
) -> None:
    """Render the overlay and `kubectl apply` it to the current kubectl context (every image pinned by digest)."""
    from xrayops.deploy import DeployError, apply

    manifests = _render_manifests(overlay, k8s_dir, image)
    try:
        mode = "server" if server_dry_run else "client" if dry_run else None
        typer.echo(apply(manifests, dry_run=mode, allow_unpinned=allow_unpinned), nl=False)
    except DeployError as exc:
        _fail(str(exc))


@deploy_app.command("pin")
def deploy_pin(
    overlay: Annotated[str, typer.Option(help="Overlay under infra/k8s/overlays whose `images:` get digests.")],
    k8s_dir: K8sDirOption = Path("infra/k8s"),
    digest: Annotated[Optional[list[str]], typer.Option(help="IMAGE=sha256:... (the name in the overlay's images:); repeat.")] = None,
    resolve: Annotated[bool, typer.Option("--resolve", help="Ask the registry (`crane digest NAME:TAG`) for images not given.")] = False,
    dockerfile: Annotated[Optional[Path], typer.Option(help="Also pin this Dockerfile's ARG PYTHON_IMAGE base image.")] = None,
    base_digest: Annotated[Optional[str], typer.Option(help="The base image's sha256 digest (else --resolve asks the registry).")] = None,
) -> None:
    """Write image digests into the overlay's kustomization.yaml (and the Dockerfile's base image); exit 2 while any stays unpinned."""
    from xrayops.deploy import DeployError, parse_digest_args, pin_dockerfile, pin_overlay

    try:
        pinned, missing = pin_overlay(k8s_dir, overlay, parse_digest_args(digest or []), resolve=resolve)
        base = pin_dockerfile(dockerfile, base_digest, resolve=resolve) if dockerfile is not None else None
    except DeployError as exc:
        _fail(str(exc))
    _print_json({"overlay": overlay, "pinned": [p.model_dump() for p in pinned],
                 "base_image": base.model_dump() if base else None, "unpinned": missing})
    if missing:
        _fail(f"still unpinned in {overlay}: {', '.join(missing)} (give --digest NAME=sha256:... or --resolve)")
