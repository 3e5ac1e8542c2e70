"""Adapter training (and full fine-tuning) on mlx-lm's model, layers and step (``pyfuse train``).

The steps, one module each: :mod:`.config` (mlx-lm's flags and YAML keys,
their precedence), :mod:`.settings` (checking them), :mod:`.data` (reading
and checking mlx-lm training data), :mod:`.targets` (which layers and
modules get adapters, DoRA's limits), :mod:`.trainer` (mlx-lm's tuner:
LoRA layers, datasets, optimizer and schedule), :mod:`.loop` (the training
loop: mlx-lm's step, checkpoints, best validation, early stop),
:mod:`.checkpoint` (the run directory, resume), :mod:`.outputs` (config,
loss curve), :mod:`.full` (``fine_tune_type: full``: the chosen layers
dequantized and trained whole, the output a model directory re-quantized
by the fuse machinery) and :mod:`.lora` (:func:`train_adapter`: the run)."""

from .data import TrainingData, load_training_data
from .lora import TrainResult, train_adapter
from .targets import parse_layers

__all__ = ["TrainResult", "TrainingData", "load_training_data", "parse_layers", "train_adapter"]
