"""Sparse fine-tuning of a PyTorch model on the entries a mask file selects.

In any PyTorch training loop (a plain loop, Hugging Face ``Trainer``,
Accelerate, Lightning)::

    import fps_onnx

    fps_onnx.prepare(model, "masks.safetensors")         # before building the optimizer
    ...train as usual: the optimizer sees only k-sized tensors...
    fps_onnx.merge(model)                                 # plain dense weights again
    model.save_pretrained("out")                          # or torch.save(model.state_dict(), ...)

:func:`prepare` (:func:`fps_onnx.torch.train.loop.prepare`) freezes every parameter,
turns each weight a mask selects entries of into a frozen tensor plus a
trainable delta of k values at fixed indices, and, by the default
:class:`~fps_onnx.torch.train.recipe.Recipe`, also trains the classification head
and the biases fully (norms frozen); ``prepare(model, masks,
Recipe(train_head=False, train_bias=False))`` trains the selected entries
alone. Build the optimizer afterwards, from the parameters that require grad
(``Trainer`` and ``accelerator.prepare`` do). Entries outside the masks are
never written: weight decay on the deltas pulls a delta towards zero, never a
frozen entry. Any optimizer works, fused AdamW (``Trainer``'s default) included. :func:`merge`
(:func:`fps_onnx.torch.train.sparse.merge`) writes the deltas into the weights and
removes the parametrisation; :func:`save_delta` and :func:`apply_delta` keep
the deltas alone.

Modules: ``sparse`` holds the parametrisation (k values + indices per weight)
and attach / merge, ``kernels`` its autograd functions, ``masks`` attaching a
mask file keyed by ONNX names, ``delta`` the delta file; ``data`` the training data readers;
``loop`` which tensors train, the optimizer, schedule and epochs; ``run`` the
whole ``fps-onnx train`` job; ``recipe`` its defaults. Importing any module but
``recipe`` needs torch (the names above load it on first use);
``fps-onnx select`` never imports this package.
"""

from __future__ import annotations

from importlib import import_module

# public name -> module that defines it (imported on first use: torch stays lazy)
_EXPORTS = {
    "prepare": "loop",
    "Trainable": "loop",
    "merge": "sparse",
    "merged_state_dict": "sparse",
    "save_delta": "delta",
    "apply_delta": "delta",
    "Recipe": "recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
