from typing import List, NamedTuple

from kfp.dsl import Model, Output

from components._image import xrayops_component


@xrayops_component
def champion_op(
    tracking_uri: str, model_name: str, alias: str, bundle: Output[Model], backbone: Output[Model]
) -> NamedTuple("ChampionOut", [("model_uri", str), ("ssl_method", str), ("arch", str), ("image_size", int)]):
    """The serving champion from the MLflow registry (models:/NAME@ALIAS): its bundle, checked
    against the recorded sha256, its backbone as a backbone.pt for the challenger to start from,
    and the image size its preprocessing expects (the new version is ingested at that size)."""
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from xrayops.bundle import export_backbone, read_bundle_meta
    from xrayops.config import get_settings
    from xrayops.registry import model_version, resolve_bundle

    tracking_uri = tracking_uri or get_settings().tracking_uri()
    ref = f"models:/{model_name}@{alias}"
    model_uri = f"models:/{model_name}/{model_version(ref, tracking_uri)}"  # pinned: the alias may move later
    downloaded = resolve_bundle(model_uri, tracking_uri, tempfile.mkdtemp(prefix="xrayops-champion-"))
    shutil.copytree(downloaded, bundle.path)
    meta = read_bundle_meta(Path(bundle.path))
    export_backbone(Path(bundle.path), Path(backbone.path) / "backbone.pt")
    for artifact in (bundle, backbone):
        artifact.metadata.update({"model_uri": model_uri, "arch": meta.arch, "ssl_method": meta.ssl_method})
    return namedtuple("ChampionOut", ["model_uri", "ssl_method", "arch", "image_size"])(
        model_uri, meta.ssl_method, meta.arch, meta.preprocessing.size
    )


@xrayops_component
def no_champions_op(tracking_uri: str, model_name: str, ssl_methods: List[str], alias: str, replace: bool) -> str:
    """Before a site training spends GPU hours: refuse to move `alias` on members (NAME-METHOD) that
    already have it, unless `replace`. Later models go through the retraining pipeline's gate."""
    from xrayops.config import get_settings
    from xrayops.registry import held_aliases

    held = held_aliases(tracking_uri or get_settings().tracking_uri(), [f"{model_name}-{m}" for m in ssl_methods],
                        alias)
    if held and not replace:
        taken = ", ".join(f"{name} (version {version})" for name, version in sorted(held.items()))
        raise RuntimeError(f"alias {alias!r} is already held by {taken}: retrain those members with the retraining "
                           "pipeline (gated against them), or run with replace_champions=true")
    return ", ".join(sorted(held)) or "none"
