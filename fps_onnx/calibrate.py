"""The calibration run: one ONNX Runtime session, one plain streaming loop.

The model is rewritten (:mod:`fps_onnx.onnx.graph`) so that it returns per-channel
sums instead of activations; each batch's float32 sums are added into float64
accumulators and dropped. Memory is that of the model plus one batch, whatever
the size of the data set.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import logging
import os
from pathlib import Path
import re
import sys
import threading
import time

import numpy as np
import onnx

from . import checkpoint as calibration_checkpoint
from . import providers
from .data import DataConfig, iter_batches
from .errors import DataError, FpsError, ModelError, NumericError, first_line
from .onnx import decoder, external, graph, validate
from .onnx.inputs import InputSpec
from .onnx.load import graph_inputs, load_checked
from .onnx.scope import ScopeConfig, in_scope
from .stats import ChannelStats, Stats

__all__ = ["DEFAULT_TOKEN_MASK", "Calibration", "CalibrationConfig", "calibrate", "find_sites"]

log = logging.getLogger(__name__)

#: loaders that lived here, importable from here for one release (fps_onnx.onnx.load now)
_MOVED = ("load_model", "load_graph")


def __getattr__(name: str):
    if name in _MOVED:
        import warnings

        from .onnx import load

        warnings.warn(f"fps_onnx.calibrate.{name} moved to fps_onnx.onnx.load.{name}", DeprecationWarning,
                      stacklevel=2)
        globals()[name] = getattr(load, name)  # warned once
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

DEFAULT_TOKEN_MASK = "attention_mask"


@dataclass(frozen=True)
class CalibrationConfig:
    """How the model is run over the data."""

    provider: str = "auto"
    statistics: tuple[str, ...] = ()  # empty: graph.STATISTICS[0] ("abs_sum")
    token_mask: str | None = None  # None: DEFAULT_TOKEN_MASK when the model has that input
    threads: int | None = None


@dataclass
class Calibration:
    """What a calibration run produced."""

    stats: Stats
    sites: list[graph.WeightSite]
    provider: str
    seconds: float
    model: onnx.ModelProto | None = None  # the graph, weights referenced in the file
    base_dir: str = ""  # folder its external weight references are relative to
    refs: list[external.ExternalRef] = field(default_factory=list)  # its checked external data


def find_sites(model: onnx.ModelProto, scope: ScopeConfig = ScopeConfig()) -> list[graph.WeightSite]:
    """The selectable weights of ``model`` (:func:`fps_onnx.onnx.scope.in_scope`), each
    checked against the statistic it is scored with (:func:`fps_onnx.validate.check_sites`)."""
    sites = in_scope(model, graph.find_weights(model), scope)
    validate.check_sites(model, sites)
    return sites


def calibrate(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    config: CalibrationConfig = CalibrationConfig(),
    data_config: DataConfig = DataConfig(),
    on_batch: Callable[[int], None] | None = None,
    check_sites: Callable[[list[graph.WeightSite]], None] | None = None,
    scope: ScopeConfig = ScopeConfig(),
    check_refs: Callable[[list[external.ExternalRef]], None] | None = None,
    checkpoint: calibration_checkpoint.CalibrationCheckpoint | None = None,
) -> Calibration:
    """Run the model over the data once and return the statistics of every weight input.

    ``check_sites(sites)`` runs before any data is read (to reject a budget
    early), as does ``check_refs(refs)`` with the model's checked external-data
    references (to refuse an output that would replace one); ``on_batch(n)``
    after each batch of ``n`` samples (progress bars). ``checkpoint``: write the
    running sums every few batches, or go on from them (:mod:`fps_onnx.checkpoint`).
    """
    began = time.perf_counter()
    chosen = providers.resolve(config.provider)
    model, folder, refs = load_checked(model_path)
    if check_refs is not None:
        check_refs(refs)
    # Hash beside the rest of the set-up (hashlib releases the GIL); any error stops it.
    stop = threading.Event()
    hashing = ThreadPoolExecutor(1)
    sha_future = hashing.submit(_timed, "digest (a thread beside the session)", external.model_sha256,
                                model_path, refs, stop)
    hashing.shutdown(wait=False)
    try:
        sites = find_sites(model, scope)
        if check_sites is not None:
            check_sites(sites)
        channels = {a: s.in_features for s in sites for a in s.activations}
        mask_name = _token_mask(model, config.token_mask)
        masked: set[str] = set()
        shapes: dict[str, list] = {}
        if mask_name is not None:
            shapes, sites, masked = _token_shapes(model, sites, mask_name)
            channels = {a: s.in_features for s in sites for a in s.activations}
            tensors = {a.tensor for s in sites for a in s.activations}
            if len(masked) < len(tensors) and decoder.is_decoder(model):
                # Every weight input of a decoder is [batch, seq, ...]; _accumulate
                # checks each batch's element counts against that.
                log.info("shape inference followed [batch, seq] to %d of %d weight inputs; "
                         "all are taken as [batch, seq, ...] (checked on every batch)",
                         len(masked), len(tensors))
                masked = {a.tensor for s in sites for a in s.activations if a.axis == -1}
            log.info("token mask %s applies to %d of %d weight inputs", mask_name, len(masked), len(tensors))
        statistics = config.statistics or graph.STATISTICS[:1]
        model, outputs = graph.add_statistics(model, sites, statistics, mask_name, masked)
        path = Path(model_path)
        built = time.perf_counter()
        log.debug("timing: graph checks and rewrite %.2f s", built - began)
        # The session computes the statistics only: logits, present.* and the
        # nodes only they need are left out.
        session = _session(decoder.prune(model, list(outputs)), path, folder, chosen, config.threads)
        provider = session.get_providers()[0]
        log.debug("timing: session build %.2f s", time.perf_counter() - built)
        log.info("running on %s", provider)

        inputs = [InputSpec.from_ort(i) for i in session.get_inputs()]
        feeder = decoder.make_feeder(inputs, mask_name, model.producer_name,
                                     decoder.past_head_sizes(model, shapes),
                                     decoder.needs_right_padding(model))
        if feeder.provided:
            log.info("inputs made by fps-onnx (first generation step): %s", _names(feeder.provided))
        inputs = [s for s in inputs if s.name not in feeder.provided]  # what the data must hold
        names = list(outputs)
        per_act: dict[graph.Activation, ChannelStats] = {}
        samples = done = 0
        if checkpoint is not None:
            ident = calibration_checkpoint.identity(sha_future.result(), data_path, statistics, mask_name,
                                                    data_config, scope)
            per_act, samples, done = calibration_checkpoint.load(checkpoint, ident, channels)
            if samples and on_batch is not None:
                on_batch(samples)
        start = time.perf_counter()
        first, step = data_config.shard or (0, 1)  # batches are numbered as in an unsharded run
        for i, feed in enumerate(iter_batches(data_path, inputs, data_config, model_path, skip=done), done):
            index = first + i * step
            full = feeder.complete(feed)  # may move padding: its mask is the one to apply
            values = _run(session, names, full, index)
            n = len(next(iter(feed.values())))
            mask = full.get(mask_name, feed.get(mask_name)) if mask_name else None
            _accumulate(per_act, outputs, names, values, mask, channels, sites, index)
            samples += n
            if checkpoint is not None:
                calibration_checkpoint.save(checkpoint, ident, per_act, samples, i + 1, data_config)
            if on_batch is not None:
                on_batch(n)
        if samples == 0:
            raise DataError(f"no samples were read from {data_path}")
        seconds = time.perf_counter() - start
        log.debug("timing: session runs %.2f s (%d samples)", seconds, samples)
        waited = time.perf_counter()
        digest = sha_future.result()
        log.debug("timing: waiting for the digest %.2f s", time.perf_counter() - waited)

        stats = Stats(digest, num_samples=samples, shard=data_config.shard,
                      batch_size=data_config.batch_size if data_config.shard else None)
        for site in sites:
            acc = ChannelStats()
            for act in site.activations:
                got = per_act[act]
                acc.add(got.abs_sum, got.sq_sum, got.count)
            stats.weights[site.key] = acc
        return Calibration(stats, sites, provider, seconds, model, folder, refs)
    except BaseException:
        stop.set()
        raise


def _timed(what: str, func, *args):
    """``func(*args)``, its wall time logged as ``timing: WHAT`` (debug)."""
    start = time.perf_counter()
    out = func(*args)
    log.debug("timing: %s %.2f s", what, time.perf_counter() - start)
    return out


def _token_shapes(model: onnx.ModelProto, sites: list[graph.WeightSite], mask_name: str
                  ) -> tuple[dict[str, list], list[graph.WeightSite], set[str]]:
    """(inferred shapes, ``sites`` with row views lifted, the weight inputs whose
    leading axes are the mask's). ONNX's own shape inference first; ONNX Runtime's
    symbolic inference (slower, and it loads sympy) only where that leaves a
    weight input not [batch, seq, ...] or a symbolic past head size unknown."""
    for symbolic in (False, True):
        shapes = graph.inferred_shapes(model, mask_name, symbolic=symbolic)
        lifted = decoder.lift_row_views(model, sites, shapes, mask_name)
        tensors = {a.tensor for s in lifted for a in s.activations}
        masked = graph.token_leading(model, tensors, mask_name, shapes)
        if len(masked) == len(tensors) and _head_sizes_known(model, shapes):
            break
    return shapes, lifted, masked


def _head_sizes_known(model: onnx.ModelProto, shapes: dict[str, list]) -> bool:
    """Whether every past input of rank 3 or more has a static last axis or one
    :func:`fps_onnx.onnx.decoder.past_head_sizes` finds in ``shapes``."""
    sizes = None
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if decoder.is_past(vi.name) and len(dims) >= 3 and not dims[-1].HasField("dim_value"):
            sizes = decoder.past_head_sizes(model, shapes) if sizes is None else sizes
            if vi.name not in sizes:
                return False
    return True


def _names(names) -> str:
    """Names for a log line, the past inputs of every layer as one entry."""
    past = [n for n in names if decoder.is_past(n)]
    shown = [n for n in names if not decoder.is_past(n)]
    if past:
        shown.append(f"{past[0].split('.')[0]}.* ({len(past)} empty)")
    return ", ".join(shown)


def _token_mask(model: onnx.ModelProto, requested: str | None) -> str | None:
    names = graph_inputs(model)
    if requested is not None:
        if requested not in names:
            raise DataError(f"token mask {requested!r} is not a model input (inputs: {', '.join(names)})")
        return requested
    return DEFAULT_TOKEN_MASK if DEFAULT_TOKEN_MASK in names else None


def _session(model: onnx.ModelProto, path: Path, folder: str, chosen: list[str], threads: int | None):
    """An ORT session for the rewritten ``model`` of ``path``; external weights are read from ``folder``.

    A runtime older than :data:`MIN_ORT` is refused. A graph of a newer IR
    version than the runtime reads is given the runtime's IR version when it
    uses nothing that version lacks (:func:`_ir_needed`).
    """
    import onnxruntime as ort

    _check_runtime(ort.__version__)
    options = providers.session_options()
    # Run each reduction as soon as its input exists, so activations die early
    # and peak memory stays that of plain inference.
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # ORT's memory pattern plans one block for every tensor of a run, the added
    # reductions' included; without it the arena reuses freed chunks (ViT-B/16,
    # batch 32: peak RSS 1.14 -> 0.79 GiB, below plain inference, same speed).
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", folder
    )
    for attempt in range(2):
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            refused = _IR_REFUSED.search(str(exc))
            if attempt or refused is None:
                raise ModelError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from exc
            _lower_ir(model, int(refused.group(1)), path, ort.__version__)
    raise AssertionError("unreachable")


#: The oldest ONNX Runtime a session is built with (as in pyproject.toml):
#: 1.24.1 is the first release that refuses external data outside the model's
#: folder; on Python 3.10, whose wheels end at 1.23.2, 1.18 (fps-onnx checks
#: every reference itself before a session is built, :mod:`fps_onnx.onnx.external`).
MIN_ORT = (1, 24, 1) if sys.version_info >= (3, 11) else (1, 18, 0)

_IR_REFUSED = re.compile(r"Unsupported model IR version: \d+, max supported IR version: (\d+)")
#: The IR version that brought each element type from IR 10 on (onnx.proto).
_TYPE_IR = {21: 10, 22: 10, 23: 11, 24: 12, 25: 13, 26: 13, 27: 14, 28: 14}
_DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")


def _check_runtime(version: str) -> None:
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    have = tuple(int(p or 0) for p in found.groups()) if found else (0, 0, 0)
    if have < MIN_ORT:
        need = ".".join(map(str, MIN_ORT))
        raise FpsError(f"ONNX Runtime {version} is too old: fps-onnx needs {need} or later "
                       f"(pip install -U 'onnxruntime>={need}', or onnxruntime-gpu)")


def _lower_ir(model: onnx.ModelProto, top: int, path: Path, version: str) -> None:
    """Give ``model`` IR version ``top`` (in place), or ModelError when it needs a newer one."""
    needed, why = _ir_needed(model)
    if needed > top:
        raise ModelError(f"{path} needs ONNX IR version {needed} ({why}); ONNX Runtime {version} "
                         f"reads IR version {top} at most")
    log.info("ONNX IR version %d given as %d, the newest ONNX Runtime %s reads",
             model.ir_version, top, version)
    model.ir_version = top


def _ir_needed(model: onnx.ModelProto) -> tuple[int, str]:
    """(the lowest IR version the graph can be given, what needs it): the IR
    version that brought each element type and type kind it uses, 10 at least
    (the model's own when lower), 11 with device configurations."""
    needed = [(min(10, model.ir_version), "")]
    types: list[onnx.TypeProto] = []
    elements: set[int] = set()
    for g in external.iter_graphs(model):
        types += [vi.type for vi in (*g.input, *g.output, *g.value_info)]
        for node in g.node:
            if getattr(node, "device_configurations", None):
                needed.append((11, "device configurations"))
            for a in node.attribute:
                if a.name in _DTYPE_ATTRIBUTES and a.type == onnx.AttributeProto.INT:
                    elements.add(a.i)
                if a.HasField("tp"):
                    types.append(a.tp)
                types += list(a.type_protos)
    for f in model.functions:
        types += [vi.type for vi in getattr(f, "value_info", [])]
    if getattr(model, "configuration", None):
        needed.append((11, "device configurations"))
    elements |= {t.data_type for t in external.iter_tensors(model)}
    while types:
        t = types.pop()
        kind = t.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            elements.add(getattr(t, kind).elem_type)
        elif kind in ("sequence_type", "optional_type"):
            types.append(getattr(t, kind).elem_type)
        elif kind == "map_type":
            elements.add(t.map_type.key_type)
            types.append(t.map_type.value_type)
        elif kind == "opaque_type":
            needed.append((14, "an opaque type"))
    for element in elements:
        if element in _TYPE_IR:
            name = onnx.TensorProto.DataType.Name(element)
            needed.append((_TYPE_IR[element], f"element type {name}"))
    return max(needed)


def _run(session, names, feed, index):
    try:
        return session.run(names, feed)
    except Exception as exc:  # noqa: BLE001
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feed.items())
        raise DataError(f"the model rejected batch {index} ({shapes}): {first_line(exc)}") from exc


def _accumulate(per_act, outputs, names, values, mask, channels, sites, index) -> None:
    for name, value in zip(names, values):
        what = outputs[name]
        acc = per_act.setdefault(what.activation, ChannelStats())
        if what.statistic == "count":
            rows = int(value) // channels[what.activation]
            if what.masked:
                batch, seq = mask.shape
                if rows % (batch * seq):
                    weights = [s.key for s in sites if what.activation in s.activations]
                    raise ModelError(
                        f"the input of {', '.join(weights[:3])} is not [batch, seq, ...] as "
                        f"{list(mask.shape)} of the token mask: its padded positions cannot be left out"
                    )
                rows = rows // (batch * seq) * int(np.count_nonzero(mask))
            acc.add(count=rows)
            continue
        if not np.all(np.isfinite(value)):
            weights = [s.key for s in sites if what.activation in s.activations]
            raise NumericError(
                f"NaN or Inf in the input of {', '.join(weights[:3])} in batch {index}"
            )
        acc.add(**{what.statistic: value})

