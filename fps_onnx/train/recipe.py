"""The training recipe: every default of ``fps-onnx train`` in one place.

Defaults follow GPS (Zhang et al., CVPR 2024) so that results are comparable:
the classification head is trained fully, biases are trained, normalisation
layers stay frozen, Adam without weight decay, linear warm-up then cosine decay.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FpsError


class RecipeError(FpsError):
    """A training setting is out of range."""


@dataclass(frozen=True)
class Recipe:
    """How a sparse fine-tuning run trains."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    min_lr: float = 1e-8
    clip_grad: float | None = None
    seed: int = 0
    train_head: bool = True
    train_bias: bool = True
    train_norm: bool = False
    amp: bool = True
    workers: int = 0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            (self.epochs >= 1, f"epochs must be at least 1, not {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, not {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, not {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, not {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be >= 0, not {self.warmup_epochs}"),
            (0 <= self.min_lr <= self.lr, f"minimum lr must be in [0, lr], not {self.min_lr}"),
            (self.clip_grad is None or self.clip_grad > 0,
             f"gradient clipping norm must be positive, not {self.clip_grad}"),
            (self.workers >= 0, f"data workers must be >= 0, not {self.workers}"),
            (0 <= self.label_smoothing < 1,
             f"label smoothing must be in [0, 1), not {self.label_smoothing}"),
        )
        for ok, message in checks:
            if not ok:
                raise RecipeError(message)
