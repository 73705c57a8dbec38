from typing import Optional

from kfp.dsl import Dataset, Input, Model, Output

from components._image import xrayops_component


@xrayops_component
def pretrain_op(
    dataset: Input[Dataset],
    epochs: int,
    batch_size: int,
    seed: int,
    backbone: Output[Model],
    method: str = "simclr",
    arch: str = "resnet18",
    lr: float = 3e-4,
    weight_decay: float = 1e-4,
    temperature: float = 0.5,
    tau_base: float = 0.9995,
    init_from: Optional[Input[Model]] = None,
):
    """Pretraining (SimCLR, BYOL or SupCon; Langer et al. 2024) of the ResNet18 backbone; the defaults
    are Langer et al. 2024's hyperparameters. `init_from` (a backbone artifact) warm-starts the run from
    an earlier backbone; with it, epochs=0 keeps that backbone as it is."""
    import shutil
    from pathlib import Path

    from xrayops.train.pretrain import PretrainConfig, pretrain

    start = Path(init_from.path) / "backbone.pt" if init_from is not None else None
    out = Path(backbone.path)
    if epochs <= 0:
        if start is None:
            raise ValueError(f"pretrain: epochs={epochs} needs an init_from backbone to keep")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(start, out / "backbone.pt")
        backbone.metadata.update({"method": method, "arch": arch, "epochs": 0, "init_from": str(start)})
        return
    cfg = PretrainConfig(
        epochs=epochs, batch_size=batch_size, seed=seed, method=method, arch=arch, lr=lr, weight_decay=weight_decay,
        temperature=temperature, tau_base=tau_base, init_from=start,
    )
    result = pretrain(Path(dataset.path), out, cfg, progress=False)
    backbone.metadata.update({"method": cfg.method, "arch": cfg.arch, "epochs": epochs, "final_loss": result.losses[-1],
                              "init_from": str(start or "")})
