"""Adapter training through mlx-lm's trainer (``pyfuse train``).

The steps, one module each: :mod:`.data` (reading and checking mlx-lm
training data), :mod:`.targets` (which layers and modules get adapters,
DoRA's limits), :mod:`.trainer` (mlx-lm's tuner: LoRA layers, datasets,
optimizer, the training loop) and :mod:`.lora` (:func:`train_adapter`: the
run, its adapter directory and loss curve)."""

from .data import TrainingData, load_training_data
from .lora import TrainResult, train_adapter
from .targets import parse_layers

__all__ = ["TrainResult", "TrainingData", "load_training_data", "parse_layers", "train_adapter"]
