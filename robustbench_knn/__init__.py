"""robustbench-knn: robustness benchmarking for k-NN classifiers on learned embeddings."""

from .config import ExperimentConfig, LossConfig, ModelConfig, TrainConfig, UsageError, get_model_config
from .knn import knn_predict
from .losses import attack_loss, exp_contrastive_loss

__all__ = ["ExperimentConfig", "ModelConfig", "LossConfig", "TrainConfig", "UsageError", "get_model_config",
           "knn_predict", "attack_loss", "exp_contrastive_loss"]
__version__ = "0.1.0"
