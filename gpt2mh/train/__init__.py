"""Supervised multi-task fine-tuning: `TrainConfig` in, `train(cfg)` runs it (see `loop`)."""
from .config import TrainConfig
from .loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
