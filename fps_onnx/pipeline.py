"""``select``: calibration, statistics, scoring and the mask file, end to end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
import logging
import math
import os
import threading
import time

from ._io import Outputs, check_writable, listed_paths, transaction
from .calibrate import CalibrationConfig, calibrate, find_sites
from .checkpoint import CalibrationCheckpoint
from .data import DataConfig
from .errors import BudgetError, DataError, StatsError, quoted
from .onnx import graph
from .onnx.external import model_sha256
from .onnx.load import load_checked
from .onnx.scope import ScopeConfig
from .selection import maskfile
from .selection.score import (
    METHODS,
    Scratch,
    SelectConfig,
    blas_per_thread,
    check_shira,
    describe_budget,
    select_one,
)
from .stats import Stats, merge_all
from .torch.train.recipe import TASKS

__all__ = ["SelectResult", "Selection", "check_budget", "run_select", "select"]

log = logging.getLogger(__name__)

#: Weights scored at once (each thread holds its scores and a partitioned copy).
SCORING_THREADS = 4


@dataclass
class SelectResult:
    """The masks and how they were obtained."""

    masks: maskfile.MaskFile
    stats: Stats
    sites: list[graph.WeightSite]
    provider: str | None
    seconds: float | None


def check_budget(sites: list[graph.WeightSite], config: SelectConfig) -> None:
    """Raise BudgetError now if the budget cannot be met by some weight."""
    for site in sites:
        config.keep(site.shape[0], math.prod(site.shape[1:]))
        check_shira(config, site.shape, f"weight {quoted(site.key)}")


def run_select(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike | None,
    select_config: SelectConfig = SelectConfig(),
    calibration: CalibrationConfig = CalibrationConfig(),
    data_config: DataConfig = DataConfig(),
    *,
    from_stats: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    stats_out: str | os.PathLike | None = None,
    on_batch: Callable[[int], None] | None = None,
    scope: ScopeConfig = ScopeConfig(),
    outputs: Outputs | None = None,
    checkpoint: CalibrationCheckpoint | None = None,
) -> SelectResult:
    """FPS masks of every selectable weight of ``model_path``.

    Statistics come from running the model over ``data_path`` or from stats
    files (``from_stats``: one, or several shards of the same model, merged).
    The sums the norm needs are always collected, plus ``calibration.statistics``;
    with ``stats_out`` both sums are collected and saved (or the merged shards
    are), so any norm can be re-selected later. The stats file is written only
    once selection has succeeded, or staged in the transaction ``outputs`` (the
    caller's, which writes the masks too); an output that is one of the inputs
    (the model, its external data, the data, a stats file) is refused before
    any work. ``checkpoint``: the calibration writes its running sums every few
    batches, or goes on from them (:mod:`fps_onnx.checkpoint`); the checkpoint
    is removed once the outputs are in place.
    """
    if stats_out is not None:
        check_writable(stats_out)
    where = checkpoint.path if checkpoint is not None else None
    with transaction(outputs, planned={"--stats-out": stats_out, "the checkpoint": where}, inputs={
        "the model": model_path, "the calibration data": data_path, "--from-stats": listed_paths(from_stats),
    }) as staged:
        result = _run_select(model_path, data_path, select_config, calibration, data_config,
                             from_stats, stats_out, on_batch, scope, staged, checkpoint)
        if stats_out is not None and result.stats.weights:
            result.stats.save(stats_out, staged)
        if where is not None:
            staged.remove(where)
        return result


def _run_select(model_path, data_path, select_config, calibration, data_config, from_stats, stats_out,
                on_batch, scope, outputs: Outputs, checkpoint: CalibrationCheckpoint | None) -> SelectResult:
    external_data = "the model's external data"
    if select_config.method not in METHODS:
        raise BudgetError(f"method {select_config.method!r} needs a PyTorch model (fps_onnx.torch.gps)")
    provider = seconds = None
    needs_activations = METHODS[select_config.method].needs_activations
    if data_config.shard is not None and from_stats:
        raise DataError("--shard splits calibration data, which --from-stats does not read: merge "
                        "the shards by giving each shard's --stats-out file to --from-stats")
    if data_config.shard is not None and not needs_activations:
        raise DataError(f"--shard splits calibration data, which method {select_config.method} "
                        "does not read")
    if needs_activations and not from_stats:
        if data_path is None:
            raise DataError(f"method {select_config.method} needs calibration data or --from-stats")
        wanted = {select_config.statistic, *calibration.statistics}
        if stats_out is not None:
            wanted |= set(graph.STATISTICS)
        calibration = replace(calibration, statistics=tuple(sorted(wanted)))
        result = calibrate(
            model_path, data_path, calibration, data_config,
            on_batch=on_batch, check_sites=lambda s: check_budget(s, select_config), scope=scope,
            check_refs=lambda refs: outputs.plan(inputs={external_data: [r.path for r in refs]}),
            checkpoint=checkpoint,
        )
        stats, sites, provider, seconds = result.stats, result.sites, result.provider, result.seconds
        model, base_dir = result.model, result.base_dir
    else:
        model, base_dir, refs = load_checked(model_path)
        outputs.plan(inputs={external_data: [r.path for r in refs]})
        sites = find_sites(model, scope)
        check_budget(sites, select_config)
        if needs_activations:
            stats = _load_shards(from_stats, model_path, sites, refs)
        else:
            stats = Stats(model_sha256(model_path, refs))
    start = time.perf_counter()
    masks = _select_all(model, sites, stats, select_config, base_dir)
    log.debug("timing: scoring and top-k %.2f s (%d weights)", time.perf_counter() - start, len(sites))
    meta: dict[str, object] = {
        "method": select_config.method,
        "norm": select_config.norm,
        "level": select_config.level,
        "budget": describe_budget(select_config),
        **select_config.options,
        "num_samples": stats.num_samples,
        "model_sha256": stats.model_sha256,
    }
    if stats.shard is not None:
        meta["shard"] = "/".join(map(str, stats.shard))
    if select_config.method == "random" or select_config.low_rank is not None:
        meta["seed"] = select_config.seed  # the random scores, or the randomized SVD's test matrix
    return SelectResult(maskfile.build(masks, sites, meta), stats, sites, provider, seconds)


def _load_shards(from_stats, model_path, sites, refs) -> Stats:
    """The statistics of one stats file, or the merged shards of one calibration
    (``refs``: the model's checked external-data references, for its digest)."""
    files = listed_paths(from_stats)
    digest = model_sha256(model_path, refs)
    shards = []
    for file in files:
        shard = Stats.load(file)
        if shard.model_sha256 != digest:
            raise StatsError(f"{file} was computed on another model than {model_path}")
        shard.check_fits({s.key: s.in_features for s in sites}, file)
        if shards and shard.statistics != shards[0].statistics:
            held = [" and ".join(sorted(s.statistics)) for s in (shards[0], shard)]
            raise StatsError(f"cannot merge {files[0]} ({held[0]}) with {file} ({held[1]}): "
                             "shards must hold the same sums (write each with --stats-out)")
        shards.append(shard)
    return merge_all(shards, files)


def _select_all(model, sites, stats: Stats, config: SelectConfig, base_dir: str = "") -> dict:
    """Masks of every site, in site order, a few weights at a time in threads
    (NumPy's partitions and arithmetic release the GIL). Weights stored as
    external data are read through read-only memory maps; each thread scores
    and partitions into work arrays it reuses from one weight to the next, and
    keeps only the indices of each mask (:meth:`maskfile.WeightMask.compact`)."""
    read = graph.weight_reader(model, base_dir, mapped=True)
    local = threading.local()

    def one(site):
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = Scratch()
        mask = select_one(read(site), site, stats.weights.get(site.key), config, scratch)
        return maskfile.WeightMask.compact(mask)

    with blas_per_thread(config), ThreadPoolExecutor(max(1, min(SCORING_THREADS, os.cpu_count() or 1))) as pool:
        return dict(zip((s.key for s in sites), pool.map(one, sites)))


@dataclass
class Selection:
    """The masks of a ``select`` run, keyed as they will be written, and where they came from."""

    masks: maskfile.MaskFile
    samples: int
    provider: str | None
    seconds: float | None


def select(
    model: str | os.PathLike,
    data: str | os.PathLike | None,
    select_config: SelectConfig = SelectConfig(),
    calibration: CalibrationConfig = CalibrationConfig(),
    data_config: DataConfig = DataConfig(),
    *,
    torch_model: str | None = None,
    torch_checkpoint: str | os.PathLike | None = None,
    task: str = "classification",
    on_batch: Callable[[int], None] | None = None,
    **options,
) -> Selection:
    """The whole ``fps-onnx select``: :func:`run_select` on the ONNX ``model`` (``options``
    are its keyword options: ``from_stats``, ``stats_out``, ``scope``, ``outputs``, ``checkpoint``), or, with
    ``select_config.method == "gps"``, the gradient baseline on the PyTorch SPEC ``model``
    and the labelled split ``data`` (``task`` "causal-lm": the causal LM ``hf:DIR`` and its token
    data), ``scope`` applied to the parameter names. With ``torch_model`` (a SPEC) the FPS masks are keyed by
    that model's parameter names and ``scope``'s exclusions applied to them too.
    torch is imported only for gps or ``torch_model``."""
    scope = options.get("scope", ScopeConfig())
    gps = select_config.method == "gps"
    if data_config.shard is not None and gps:
        raise DataError("--shard splits FPS calibration data; --method gps reads all of DATA")
    if task not in TASKS:
        raise DataError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if task != "classification" and not gps:
        raise DataError(f"--task {task} names the loss of --method gps; method {select_config.method} has none")
    if torch_model is not None or gps:
        from .torch.models import check_spec

        # gps runs PyTorch now; --torch-model builds its model after the session is
        # gone, so torch is not imported beside the session (the rest of the checks then).
        check_spec(model if gps else torch_model, imports=gps)
    if gps and task == "causal-lm":
        from .torch.gps import gps_select_causal

        result = gps_select_causal(model, data, select_config, scope=scope, batch_size=data_config.batch_size,
                                   max_samples=data_config.max_samples, max_length=data_config.max_length,
                                   on_batch=on_batch)
        return Selection(result.masks, result.samples, "torch", result.seconds)
    if gps:
        from .torch.gps import gps_select

        result = gps_select(model, data, select_config, checkpoint=torch_checkpoint,
                            image_size=data_config.image_size, batch_size=data_config.batch_size,
                            max_samples=data_config.max_samples, on_batch=on_batch, scope=scope)
        return Selection(result.masks, result.samples, "torch", result.seconds)
    result = run_select(model, data, select_config, calibration, data_config, on_batch=on_batch, **options)
    masks = result.masks
    if torch_model is not None:
        from .selection.exclude import drop_excluded
        from .torch.mapping import map_to_model

        masks, report = map_to_model(masks, torch_model, model, checkpoint=torch_checkpoint)
        log.info("%s", report.summary())
        masks = drop_excluded(masks, scope)  # --exclude also matches PyTorch names
    return Selection(masks, result.stats.num_samples, result.provider, result.seconds)
