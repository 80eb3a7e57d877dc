"""robustbench-knn: robustness benchmarking for k-NN classifiers on learned embeddings."""

from .config import ExperimentConfig, LossConfig, ModelConfig, TrainConfig, UsageError, get_model_config
from .defenses.defense import KNNDefense
from .defenses.knn import knn_predict
from .defenses.potential import attack_loss
from .paper.losses import exp_contrastive_loss

__all__ = ["benchmark", "BenchmarkResult", "KNNDefense", "ExperimentConfig", "ModelConfig", "LossConfig",
           "TrainConfig", "UsageError", "get_model_config", "knn_predict", "attack_loss", "exp_contrastive_loss"]
__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: the API pulls in the toolkits, `import robustbench_knn` stays light
    if name in ("benchmark", "BenchmarkResult"):
        from .evaluation import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
