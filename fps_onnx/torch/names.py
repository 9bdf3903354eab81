"""Exported weights get their PyTorch parameter's name back.

An exporter may rename a weight (the dynamo exporter's ``val_13``); each such
weight is matched to its parameter by value (:mod:`fps_onnx.torch.mapping`)
and its initializer renamed, subgraphs included.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from ..onnx import external, graph
from . import mapping

__all__ = ["restore_names"]


def restore_names(model: onnx.ModelProto, state_dict: Mapping[str, object],
                  base_dir: str = "") -> dict[str, str]:
    """Rename weights an exporter renamed to their parameter's name (in place).

    Each selectable weight not named like a parameter is matched by value
    (exactly, W or W^T) and its initializer renamed when that name is free.
    A renamed weight may hold the transpose of the parameter; its layout in
    :func:`fps_onnx.onnx.graph.find_weights` says so. External data is read from
    ``base_dir``. Returns old -> new names.
    """
    sites = [s for s in graph.find_weights(model) if s.key not in state_dict]
    if not sites:
        return {}
    values = dict((s.key, w) for s, w in graph.iter_weight_values(model, sites, base_dir))
    strict = mapping.MatchConfig(rtol=0.0, atol=0.0, half_rtol=0.0, half_atol=0.0, scaled=False)
    report = mapping.match_weights(values, state_dict, {s.key: s.dtype for s in sites}, strict)
    taken = {t.name for t in model.graph.initializer}
    taken |= {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    renamed = {}
    for key, match in report.matches.items():
        if match.how == "order" or match.torch_name in taken:
            continue  # ambiguous, or the name is used (tied weights): leave it to `map`
        renamed[key] = match.torch_name
        taken.add(match.torch_name)
    _rename(model.graph, renamed)
    return renamed


def _rename(g: onnx.GraphProto, names: Mapping[str, str]) -> None:
    if not names:
        return
    for t in g.initializer:
        t.name = names.get(t.name, t.name)
    for vi in [*g.input, *g.value_info]:
        vi.name = names.get(vi.name, vi.name)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
        for attr in node.attribute:  # subgraphs (If/Loop) may use the weight too
            for sub in external.subgraphs(attr):
                _rename(sub, names)
