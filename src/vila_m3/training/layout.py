"""Names inside a training run folder (see :mod:`vila_m3.training.trainer`)."""

MODEL_DIR = "model"
"""The fine-tuned checkpoint, in the released layout."""

STEPS_DIR = "steps"
"""Resumable step checkpoints, ``checkpoint-<step>``."""
