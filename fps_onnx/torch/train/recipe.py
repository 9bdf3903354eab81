"""The training recipe: every default of ``fps-onnx train`` in one place.

Classification defaults (:class:`Recipe`) follow GPS (Zhang et al., CVPR 2024)
so that results are comparable: the classification head is trained fully,
biases are trained, normalisation layers stay frozen, Adam without weight
decay, linear warm-up then cosine decay. Causal language models
(:class:`CausalLMRecipe`, ``--task causal-lm``) train the selected entries
alone: no head, biases and norms frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..._limits import MAX_LENGTH, SEED_MAX, whole_number
from ...errors import FpsError

__all__ = ["BASE_DTYPES", "TASKS", "CausalLMRecipe", "Recipe", "RecipeError"]

#: The losses of ``train --task`` and ``select --method gps --task``.
TASKS = ("classification", "causal-lm")

#: Values of ``Recipe.base_dtype`` (None: fp32 on CPU, bf16 on CUDA; see ``precision.base_dtype``).
BASE_DTYPES = (None, "bf16", "fp16", "fp32")


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
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    accumulate: int = 1  # batches per optimizer step (gradient accumulation)
    checkpointing: bool = False  # activation checkpointing (recompute in the backward pass)
    max_length: int = 1024  # tokens per text sample (causal LMs; capped at the model's positions)
    base_dtype: str | None = None  # frozen weights: "bf16", "fp16" or "fp32" (None: precision.base_dtype)
    fsdp: bool = False  # shard the model over the torchrun processes (FSDP2) instead of replicating it
    chunked_loss: bool = False  # causal LMs: the loss from the hidden states a chunk of tokens at a time

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
            (self.max_steps is None or self.max_steps >= 1,
             f"max steps must be at least 1, not {self.max_steps}"),
            (self.accumulate >= 1, f"gradient accumulation must be at least 1 batch, not {self.accumulate}"),
            (self.base_dtype in BASE_DTYPES, f"--base-dtype must be one of {', '.join(BASE_DTYPES[1:])}, "
                                             f"not {self.base_dtype!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise RecipeError(message)
        whole_number(self.seed, "the seed", RecipeError, 0, SEED_MAX)
        whole_number(self.max_length, "--max-length", RecipeError, 2, MAX_LENGTH)


@dataclass(frozen=True)
class CausalLMRecipe(Recipe):
    """Defaults for causal language models: only the selected entries train.

    No new head (``train_head=True`` trains the existing ``lm_head`` fully,
    and with it a tied embedding), biases and norms frozen; the best epoch is
    the one of lowest validation loss.
    """

    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-4
    warmup_epochs: float = 0.1
    train_head: bool = False
    train_bias: bool = False
