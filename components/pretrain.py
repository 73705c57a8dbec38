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
):
    """Pretraining (SimCLR, BYOL or SupCon; paper 000) of the ResNet18 backbone; the defaults
    are paper 000's hyperparameters."""
    from pathlib import Path

    from xrayops.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        epochs=epochs, batch_size=batch_size, seed=seed, method=method, arch=arch, lr=lr, weight_decay=weight_decay,
        temperature=temperature, tau_base=tau_base,
    )
    result = pretrain(Path(dataset.path), Path(backbone.path), cfg, progress=False)
    backbone.metadata.update({"method": cfg.method, "arch": cfg.arch, "final_loss": result.losses[-1]})
