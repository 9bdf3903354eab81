"""PEFT SHiRA adapters on the entries a mask file selects.

SHiRA (``peft.ShiraConfig``) trains a sparse delta of exactly r*(in+out)
entries of each adapted ``nn.Linear`` weight [out, in], at the ones of a mask
that ``config.mask_fn(base_layer, r, **kwargs)`` returns (a 0/1 tensor of the
weight's shape, dtype and device). :func:`shira_config` hands PEFT our masks
through that hook::

    from peft import get_peft_model
    from fps_onnx.integrations.peft import shira_config

    config = shira_config(model, "masks.safetensors", modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    ...train...
    # optional: train --step-scale's per-channel factors on the adapter's steps
    # scale_steps(peft_model, optimizer, "masks.safetensors", "stats.safetensors")
    peft_model.save_pretrained("adapter")        # indices travel with the adapter
    merged = peft_model.merge_and_unload()

Select masks of that size with ``fps-onnx select --shira-r R`` (the top
R*(in+out) entries of each Linear weight). The adapter saves its indices, so
``PeftModel.from_pretrained`` needs no mask function. PEFT passes ``mask_fn`` the
layer, not its name: the config maps the layers of the ``model`` it was built
from, so give ``get_peft_model`` that same model.
"""

from __future__ import annotations

from collections.abc import Mapping
import logging
import os
import re
import warnings
import weakref

from ..errors import MaskError
from ..selection.maskfile import MaskFile, WeightMask, mask_file_of
from ..selection.stepscale import column_scales
from ..stats import Stats
from ..torch.models import resolve_keys
from . import MissingExtra

__all__ = ["MASK_TYPE", "ShiraMasks", "scale_steps", "shira_config"]

try:
    import peft
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise MissingExtra(exc.name or "peft", "peft") from exc

log = logging.getLogger(__name__)

MASK_TYPE = "fps"  # ShiraConfig.mask_type of a custom mask function (not saved with a function)
_OWN = ("r", "target_modules", "mask_type", "mask_fn")


class ShiraMasks:
    """``mask_fn`` for PEFT SHiRA: the mask of each layer of one model, found by identity."""

    def __init__(self, r: int, layers: Mapping[str, tuple[torch.nn.Module, WeightMask]]) -> None:
        self.r = r
        # id(layer) -> (weak reference, module name, mask); weak: a config must not keep a model alive
        self._layers = {id(m): (weakref.ref(m), name, mask) for name, (m, mask) in layers.items()}

    @property
    def names(self) -> list[str]:
        """Module names of the adapted layers."""
        return sorted(name for _, name, _ in self._layers.values())

    def __call__(self, base_layer: torch.nn.Module, r: int, **kwargs) -> torch.Tensor:
        entry = self._layers.get(id(base_layer))
        if entry is None or entry[0]() is not base_layer:
            shape = list(getattr(getattr(base_layer, "weight", None), "shape", []))
            raise MaskError(f"SHiRA asked for the mask of a layer ({type(base_layer).__name__} {shape}) "
                            "that shira_config did not see; build the config from the model you adapt")
        _, name, mask = entry
        if r != self.r:
            raise MaskError(f"the masks were selected for SHiRA r={self.r}, the config asks r={r} "
                            f"for {name}")
        weight = base_layer.weight
        return torch.from_numpy(mask.dense()).to(device=weight.device, dtype=weight.dtype)


def _targets(layers: Mapping[str, object], modules: Mapping[str, object]) -> list[str] | str:
    """``target_modules`` naming exactly ``layers``: their names, as PEFT matches a name or a
    ``.``-suffix; a full-match pattern where another module's name ends with one of them."""
    names = sorted(layers)
    wanted = set(names)
    if any(m not in wanted and any(m.endswith("." + n) for n in names) for m in modules):
        return "|".join(re.escape(n) for n in names)
    return names


def shira_config(
    model: torch.nn.Module,
    masks: Mapping[str, object] | MaskFile | str | os.PathLike,
    **kwargs,
) -> peft.ShiraConfig:
    """A ``peft.ShiraConfig`` adapting each ``nn.Linear`` of ``model`` that ``masks`` select entries of.

    ``masks``: name -> bool array [out, in], a MaskFile or its path; keys are
    parameter names ``<module>.weight`` (a backbone's names under a task wrapper
    resolve as in :func:`fps_onnx.torch.models.resolve_keys`); a mask that selects
    nothing is left out. ``target_modules`` are those modules, ``r`` comes from
    the masks: each must select exactly r*(in+out) entries, the same r for all
    (``fps-onnx select --shira-r R``), else :class:`MaskError`; so does a key
    that is not an ``nn.Linear`` weight or a mask of another shape. ``kwargs``
    go to ``ShiraConfig`` (``modules_to_save``, ``init_weights``, ...).
    """
    given = sorted(set(_OWN) & set(kwargs))
    if given:
        raise TypeError(f"shira_config sets {', '.join(given)} from the masks; do not pass them")
    loaded = mask_file_of(masks)
    keys = [k for k in loaded.keys() if loaded.count(k)]
    if not keys:
        raise MaskError("the masks select no entries")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    resolved = resolve_keys(keys, params)
    layers: dict[str, tuple[torch.nn.Module, WeightMask]] = {}
    r_of: dict[str, int] = {}
    for key in keys:
        name = resolved.get(key)
        if name is None:
            raise MaskError(f"mask {key!r} names no parameter of the model; map the masks onto it "
                            "first (fps-onnx map, or select --torch-model)")
        module_name, _, tensor = name.rpartition(".")
        module = modules.get(module_name)
        if tensor != "weight" or type(module) is not torch.nn.Linear:
            raise MaskError(f"mask {key!r}: {name} is not the weight of an nn.Linear; SHiRA adapts "
                            "nn.Linear weights only (leave it out of the masks)")
        out, fan_in = module.weight.shape
        if loaded.shape(key) != (out, fan_in):
            raise MaskError(f"mask {key!r} has shape {list(loaded.shape(key))}, but {name} is [{out}, {fan_in}]")
        count = loaded.count(key)
        if count % (out + fan_in):
            raise MaskError(f"mask {key!r} selects {count} entries of {name} [{out}, {fan_in}], not a "
                            f"multiple r*(in+out) of {out + fan_in} as SHiRA needs "
                            "(select with fps-onnx select --shira-r R)")
        r_of[key] = count // (out + fan_in)
        layers[module_name] = (module, loaded.mask(key))
    values = sorted(set(r_of.values()))
    if len(values) > 1:
        first = {r: k for k, r in r_of.items()}
        raise MaskError(f"the masks disagree on SHiRA r: {first[values[0]]!r} has r={values[0]}, "
                        f"{first[values[-1]]!r} has r={values[-1]}; SHiRA takes one r for all layers")
    r = values[0]
    for name in kwargs.get("modules_to_save") or ():
        inside = [m for m in layers if re.match(rf"(^|.*\.){name}($|\..*)", m)]
        if inside:
            raise MaskError(f"{inside[0]} has a mask but is in modules_to_save ({name}, trained fully); "
                            "leave its mask out or the module out of modules_to_save")
    with warnings.catch_warnings():  # PEFT warns about any mask_type but "random" until mask_fn is set
        warnings.simplefilter("ignore")
        config = peft.ShiraConfig(r=r, mask_type=MASK_TYPE, target_modules=_targets(layers, modules),
                                    **kwargs)
    config.mask_fn = ShiraMasks(r, layers)
    log.info("SHiRA r=%d on %d Linear layers, %s trainable entries", r, len(layers),
             f"{sum(m.count for _, m in layers.values()):,}")
    return config


def scale_steps(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                masks: MaskFile | str | os.PathLike, stats: Stats | str | os.PathLike,
                adapter: str = "default") -> torch.optim.Optimizer:
    """``fps-onnx train --step-scale`` on a SHiRA adapter: each step ``optimizer`` makes of a value of
    a layer's ``shira_weight`` (entry (row, column) of its ``shira_indices``) is multiplied by
    ``min(1, median(s) / s_column)``, the factor of the entry's input channel.

    After ``get_peft_model(model, shira_config(model, masks))``, on the optimizer built over the
    adapter's parameters, before the first step. ``masks``: the MaskFile or path the config was built
    from (from ``fps-onnx select``: its metadata names the model and statistic); ``stats``: a Stats or
    the path of ``select ... --stats-out``, of that model (StatsError otherwise). Each mask that
    selects entries must name one SHiRA layer of ``adapter`` (its module name, or a ``.``-suffix of
    one), else MaskError. Returns ``optimizer``, its step hooks registered.
    """
    from ..torch.train.loop import scale_optimizer_steps

    loaded = mask_file_of(masks)
    scales = column_scales(loaded, stats)
    layers = {f"{name}.weight": m for name, m in peft_model.named_modules()
              if isinstance(m, peft.tuners.shira.layer.ShiraLayer) and adapter in m.shira_weight}
    keys = [k for k in scales if loaded.count(k)]
    resolved = resolve_keys(keys, layers)  # the naming rule shira_config matched them by
    pairs = []
    for key in keys:
        name = resolved.get(key)
        if name is None:
            raise MaskError(f"mask {key!r} names no SHiRA layers of adapter {adapter!r} in the model "
                            "(build the adapter with shira_config(model, masks) from these masks)")
        layer, factors = layers[name], scales[key]
        columns = layer.shira_indices[adapter][1].long().cpu()
        if columns.numel() and int(columns.max()) >= len(factors):
            raise MaskError(f"mask {key!r}: {len(factors)} input-channel factors do not fit {name}")
        pairs.append((layer.shira_weight[adapter], torch.from_numpy(factors)[columns]))
    return scale_optimizer_steps(optimizer, pairs)
