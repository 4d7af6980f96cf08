"""The Accelerate training engine (supervised, MAE, finetune), checkpoints and exact resume.

``train(cfg)`` is the entry point used by ``vitpipe train`` and by the Prefect flow; the same
command works under ``accelerate launch`` (multi-process, multi-node).
"""

from .engine import TrainingInterrupted, micro_batch_size, train

__all__ = ["TrainingInterrupted", "micro_batch_size", "train"]
