"""Masks in JAX: a bool pytree in Flax layout, and an optax transformation that trains only it.

::

    import optax
    from fps_onnx.integrations.optax import mask_tree, scale_updates, step_scale_tree, zero_unselected

    tree = mask_tree(params, "masks.safetensors")          # params: a Flax params tree
    tx = optax.chain(optax.adamw(1e-3, weight_decay=0.1), zero_unselected(tree))

    # or train --step-scale's per-channel step factors (0 where not selected), in its place:
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1),
                     scale_updates(step_scale_tree(params, "masks.safetensors", "stats.safetensors")))

:func:`zero_unselected` must be the **last** element of the chain: it zeroes the
final updates of every unselected entry, so nothing before it (weight decay,
momentum, clipping) can move a frozen entry. Placed before ``adamw`` it only
masks the gradients, and weight decay still moves every entry. The optimizer
state stays dense (Adam's moments are params-sized; only the updates are masked).

Layout: our masks are PyTorch's, [out, in] for Linear and [out, in/groups, kh, kw]
for Conv; a Flax ``Dense`` kernel is [in, out] and a ``Conv`` kernel
[kh, kw, in/groups, out], so masks of leaves named ``kernel`` are transposed
(``[out, in, *window]`` -> ``[*window, in, out]``); any other leaf (``Embed``'s
``embedding``, which PyTorch stores the same way) takes its mask as it is.
Leaves without a mask are all False: frozen (set a leaf to ``True`` with
``jax.tree`` functions to train, say, a head fully).

Names: ``names`` maps a leaf's path, its keys joined by ``/``
(``params/Dense_0/kernel``), to a mask key (``fc1.weight``). Without it, a tree
converted from PyTorch with the same module names maps automatically: the
leading ``params`` collection is dropped, the other keys are joined by ``.``,
and the last key ``kernel`` or ``embedding`` becomes ``weight``
(``params/encoder/layer_0/dense/kernel`` -> ``encoder.layer_0.dense.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
import os

import numpy as np

from ..errors import MaskError
from ..selection.maskfile import MaskFile, mask_file_of
from ..selection.stepscale import column_scales, entry_factors
from ..stats import Stats
from . import MissingExtra

__all__ = ["check_fits", "mask_tree", "scale_updates", "step_scale_tree", "to_flax", "torch_name", "zero_unselected"]

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as exc:  # pragma: no cover - exercised only without jax
    raise MissingExtra(exc.name or "jax", "jax") from exc

_TRANSPOSED = "kernel"
_AS_WEIGHT = ("kernel", "embedding")


def _path(key_path) -> str:
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def torch_name(path: str) -> str:
    """The PyTorch parameter name a Flax leaf path stands for (the automatic mapping)."""
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    if parts[-1] in _AS_WEIGHT:
        parts[-1] = "weight"
    return ".".join(parts)


def to_flax(mask: np.ndarray, leaf_name: str) -> np.ndarray:
    """A mask in PyTorch layout, in the layout of the Flax leaf called ``leaf_name``."""
    if leaf_name != _TRANSPOSED or mask.ndim < 2:
        return mask
    return np.transpose(mask, (*range(2, mask.ndim), 1, 0))


def mask_tree(
    params,
    masks: Mapping[str, object] | MaskFile | str | os.PathLike,
    names: Mapping[str, str] | None = None,
):
    """A pytree of bool arrays shaped like ``params`` (a Flax params tree): True = train this entry.

    ``masks``: name -> bool array in PyTorch layout, a MaskFile or its path;
    ``names``: leaf path (``params/Dense_0/kernel``) -> mask key, or None for the
    automatic mapping of a tree converted from PyTorch (module docstring). Every
    mask must land on one leaf of its shape, and every path in ``names`` must be
    a leaf and name a mask; else :class:`MaskError`.
    """
    loaded = mask_file_of(masks)
    return _tree(params, loaded, names, loaded.dense, bool)


def step_scale_tree(
    params,
    masks: MaskFile | str | os.PathLike,
    stats: Stats | str | os.PathLike,
    names: Mapping[str, str] | None = None,
):
    """``fps-onnx train --step-scale``'s factors as a float32 pytree shaped like ``params``: each
    selected entry's ``min(1, median(s) / s_j)`` (``s_j``: its input channel's statistic), 0 for
    every entry not selected. Give it to :func:`scale_updates`, in place of :func:`zero_unselected`.

    ``masks``: a MaskFile or its path, from ``fps-onnx select`` (its metadata names the model and
    statistic); ``stats``: a Stats or the path of ``select ... --stats-out``, of that model
    (StatsError otherwise); ``names`` and the layout as :func:`mask_tree`.
    """
    loaded = mask_file_of(masks)
    scales = column_scales(loaded, stats)
    return _tree(params, loaded, names, lambda key: entry_factors(loaded, key, scales[key]), jnp.float32)


def _tree(params, loaded: MaskFile, names: Mapping[str, str] | None, value_of, dtype):
    """``value_of(mask key)`` (an array in PyTorch layout) on the leaf each mask maps to, in Flax
    layout; zeros of ``dtype`` on every other leaf (:func:`mask_tree`'s mapping and errors)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_path(p) for p, _ in leaves]
    if names is not None:
        unknown = sorted(set(names) - set(paths))
        if unknown:
            raise MaskError(f"names: {unknown[0]!r} is not a leaf of the params (leaves look like "
                            f"{paths[0]!r})" if paths else f"names: {unknown[0]!r}: the params tree is empty")
        missing = sorted(k for k in names.values() if k not in loaded)
        if missing:
            raise MaskError(f"names: mask {missing[0]!r} is not in the masks")
        key_of = dict(names)
    else:
        key_of = {p: torch_name(p) for p in paths if torch_name(p) in loaded}
    used = set()
    out = []
    for path, (_, leaf) in zip(paths, leaves):
        shape = tuple(np.shape(leaf))
        key = key_of.get(path)
        if key is None:
            out.append(jnp.zeros(shape, dtype))
            continue
        if key in used:
            raise MaskError(f"mask {key!r} is given to two leaves of the params")
        used.add(key)
        value = to_flax(value_of(key), path.rsplit("/", 1)[-1])
        if value.shape != shape:
            raise MaskError(f"mask {key!r} {list(loaded.shape(key))} does not fit the leaf {path} "
                            f"{list(shape)} (as {list(value.shape)} in Flax layout)")
        out.append(jnp.asarray(value, dtype))
    left = sorted(set(loaded.keys()) - used)
    if left:
        hint = "" if names is not None else "; give names={leaf path: mask key}"
        raise MaskError(f"mask {left[0]!r} matches no leaf of the params{hint}")
    return jax.tree_util.tree_unflatten(treedef, out)


def check_fits(tree, params) -> None:
    """MaskError unless ``tree`` has the leaves (paths and shapes) of ``params``."""
    want = {_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    have = {_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise MaskError(f"the mask tree has no leaf {path} of the params")
        if path not in want:
            raise MaskError(f"the mask tree's leaf {path} is not in the params")
        if have[path] != want[path]:
            raise MaskError(f"the mask tree's leaf {path} is {list(have[path])}, "
                            f"the params' {list(want[path])}")


def zero_unselected(tree) -> optax.GradientTransformation:
    """An optax transformation setting the update of every entry ``tree`` marks False to zero.

    Stateless; put it LAST in ``optax.chain`` (after ``adamw``): only then do
    weight decay and momentum leave the unselected entries exactly as they
    were. ``init`` checks that ``tree`` fits the params (MaskError otherwise).
    """
    return _per_entry(tree, lambda u, m: jnp.where(m, u, jnp.zeros_like(u)))


def scale_updates(tree) -> optax.GradientTransformation:
    """An optax transformation multiplying each update entry by ``tree``'s (:func:`step_scale_tree`:
    0 for the entries not selected, so it freezes them as :func:`zero_unselected` does).

    Stateless; put it LAST in ``optax.chain`` (after ``adamw``): the whole step, weight decay
    included, is scaled, as ``fps-onnx train --step-scale`` scales it. ``init`` checks that ``tree``
    fits the params (MaskError otherwise).
    """
    return _per_entry(tree, lambda u, f: u * f.astype(u.dtype))


def _per_entry(tree, apply) -> optax.GradientTransformation:
    """A stateless transformation: each update leaf ``u`` becomes ``apply(u, its leaf of tree)``;
    ``init`` checks that ``tree`` fits the params."""
    def init(params):
        check_fits(tree, params)
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(apply, updates, tree), state

    return optax.GradientTransformation(init, update)
