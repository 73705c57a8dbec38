"""The demo loop and the drift scenario (xrayops.app.demo, xrayops.app.scenario)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from xrayops.app.cli.common import app, console, _fail, PretrainEpochsOption
from xrayops.config import get_settings


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every artefact of the run.")] = Path("outputs/demo"),
    n: Annotated[int, typer.Option(help="Training images to synthesise.")] = 1400,
    pretrain_epochs: PretrainEpochsOption = 12,
    skip_pipeline_run: Annotated[bool, typer.Option("--skip-pipeline-run", help="Compile the KFP pipeline but do not run it.")] = False,
    scenario: Annotated[
        str, typer.Option(help="loop: the whole loop once; drift: a vendor-shifted batch with more wrong tags -> "
                               "monitoring -> trigger -> retrain on the new DVC version -> gate -> promotion -> reload.")
    ] = "loop",
    screenshot: Annotated[Optional[Path], typer.Option(help="drift scenario: where to save the dashboard PNG (default OUT/dashboard.png).")] = None,
    review_budget: Annotated[
        int, typer.Option(min=0, help="drift scenario: suspect labels reviewed before retraining (0: retrain on the raw tags).")
    ] = 200,
    backbone: Annotated[
        Optional[Path], typer.Option(help="drift scenario: use this pretrained backbone.pt instead of pretraining on v1.")
    ] = None,
) -> None:
    """The whole loop on this machine: synth, ingest, version, pretrain, finetune, evaluate, register, serve, monitor, pipeline."""
    from xrayops.app.demo import DemoConfig, print_summary, run_demo, with_demo_key

    # Synthetic data under a public key, the same on every machine (data.dvc's md5 depends on it).
    if scenario == "drift" and backbone is not None and not backbone.is_file():
        _fail(f"backbone {backbone} not found")  # before anything is set up
    settings = with_demo_key(get_settings())
    console.print("de-identification: the public demo key (synthetic data only; pseudonyms anyone can recompute)")
    if scenario == "drift":
        from xrayops.app.scenario import DriftScenarioConfig, run_drift_scenario


        default_out = Path("outputs/demo")
        cfg = DriftScenarioConfig(out=Path("outputs/demo-drift") if out == default_out else out, n=n,
                                  pretrain_epochs=pretrain_epochs, screenshot=screenshot, review_budget=review_budget,
                                  backbone=backbone)
        print_summary(run_drift_scenario(cfg, settings), console=Console())
        return
    if scenario != "loop":
        _fail(f"unknown scenario {scenario!r}: loop or drift")
    summary = run_demo(
        DemoConfig(out=out, n=n, pretrain_epochs=pretrain_epochs, run_pipeline=not skip_pipeline_run), settings
    )
    print_summary(summary, console=Console())
