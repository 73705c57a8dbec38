from kfp.dsl import Dataset, Input, Model, Output

from components._image import xrayops_component


@xrayops_component
def pretrain_op(
    dataset: Input[Dataset], epochs: int, batch_size: int, seed: int, backbone: Output[Model], method: str = "simclr"
):
    """Pretraining (SimCLR, BYOL or SupCon; paper 000) of the ResNet18 backbone."""
    from pathlib import Path

    from xrayops.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, method=method)
    result = pretrain(Path(dataset.path), Path(backbone.path), cfg, progress=False)
    backbone.metadata.update({"method": cfg.method, "arch": cfg.arch, "final_loss": result.losses[-1]})
