"""Self-supervised pretraining and linear-head fine-tuning."""
from xrayops.train.finetune import FinetuneConfig, finetune
from xrayops.train.pretrain import PretrainConfig, PretrainError, PretrainResult, pretrain

__all__ = ["FinetuneConfig", "PretrainConfig", "PretrainError", "PretrainResult", "finetune", "pretrain"]
