"""The calibration checkpoint: ``select --checkpoint-every N`` and ``select --resume``.

The checkpoint is a stats file (:mod:`fps_onnx.stats`: format "fps-stats",
version 1) of the running sums of each weight input, written atomically every
N batches to ``OUTPUT.checkpoint`` beside the mask file and removed once the
masks are written. Its keys are the weight inputs (activations), each as the
JSON ``[tensor, axis, rank]``, since several weights may read one input (and
their sums are added per weight only at the end); its metadata adds
``checkpoint`` = "select", ``batches`` (the batches done) and ``identity`` (JSON:
the model's SHA-256, the data's :func:`fps_onnx._io.content_digest`, the sums
collected, the token mask, and the data and scope options). It is not a stats
file for ``--from-stats``: write that with ``--stats-out``.

``--resume`` goes on from the checkpoint when there is one (and starts from the
first batch when there is none); a checkpoint of another model, data or
options, or a damaged one, is one :class:`~fps_onnx.errors.CheckpointError`.

Bit for bit: each weight input's sums are float64 accumulators to which every
batch's float32 sums are added, in batch order (:meth:`ChannelStats.add`); the
checkpoint holds them exactly, and the resumed run adds the batches after
``batches`` to them in the same order, its first batches not even assembled
(:func:`fps_onnx.data.iter_batches`'s ``skip``). So its statistics, and its
masks, are those of an uninterrupted run, on the same execution provider and
thread count (other ones round the per-batch sums otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
import json
import logging
import os
from pathlib import Path

from ._io import content_digest, read_safetensors
from ._limits import INT64_MAX, read_json, shown, whole_number
from .data import DataConfig
from .errors import CheckpointError, DataError, StatsError
from .onnx.scope import ScopeConfig
from .onnx.sites import Activation
from .stats import FORMAT, FORMAT_VERSION, ChannelStats, Stats

__all__ = ["SUFFIX", "CalibrationCheckpoint", "activation_key", "check_identity", "identity", "load", "save"]

log = logging.getLogger(__name__)

#: What the checkpoint's name adds to the mask file's.
SUFFIX = ".checkpoint"
_KIND = "select"


@dataclass(frozen=True)
class CalibrationCheckpoint:
    """Where a calibration's checkpoint lives, how often it is written, and whether to go on from it."""

    path: str | os.PathLike
    every: int | None = None  # batches between checkpoints (None: none written)
    resume: bool = False  # go on from ``path`` when it exists

    def __post_init__(self) -> None:
        if self.every is not None:
            whole_number(self.every, "--checkpoint-every", CheckpointError, 1)

    @classmethod
    def beside(cls, output: str | os.PathLike, every: int | None = None, resume: bool = False
               ) -> CalibrationCheckpoint:
        """The checkpoint of the mask file ``output``: ``OUTPUT.checkpoint``."""
        return cls(f"{os.fspath(output)}{SUFFIX}", every, resume)


def activation_key(activation: Activation) -> str:
    """An activation as the checkpoint names it: the JSON ``[tensor, axis, rank]``."""
    return json.dumps([activation.tensor, activation.axis, activation.rank])


def identity(model_sha256: str, data_path: str | os.PathLike, statistics: Sequence[str], token_mask: str | None,
             data_config: DataConfig, scope: ScopeConfig) -> dict:
    """What makes two calibrations the same: a checkpoint is taken up only by a run of the same identity."""
    return json.loads(json.dumps({
        "model_sha256": model_sha256,
        "data_sha256": content_digest(data_path, DataError),
        "statistics": sorted(statistics),
        "token_mask": token_mask,
        "data": asdict(data_config),
        "scope": asdict(scope),
    }))


_DIFFERS = {
    "model_sha256": "it is of another model",
    "data_sha256": "it is of other calibration data",
    "statistics": "it holds other sums (--stats-out, --norm)",
    "token_mask": "it masks padding with another input (--token-mask)",
}


def load(config: CalibrationCheckpoint, ours: dict, activations: Mapping[Activation, int]
         ) -> tuple[dict[Activation, ChannelStats], int, int]:
    """(running sums by activation, samples, batches done) from the checkpoint, every part
    checked against this run (``activations``: each weight input -> its channels); empty
    when not resuming or when there is no checkpoint yet."""
    path = Path(config.path)
    if not config.resume:
        return {}, 0, 0
    if not path.exists():
        log.info("no checkpoint at %s: calibrating from the first batch", path)
        return {}, 0, 0
    try:
        stats = Stats.load(path)
        _, meta = read_safetensors(path, FORMAT, FORMAT_VERSION, StatsError, "statistics", with_tensors=False)
    except StatsError as exc:
        raise CheckpointError(f"cannot resume: {exc}") from exc
    if meta.get("checkpoint") != _KIND:
        raise CheckpointError(f"{path} is a stats file, not a checkpoint of `fps-onnx select`")
    _check_identity(read_json(meta.get("identity", ""), f"{path}: metadata 'identity'", CheckpointError), ours, path)
    batches = whole_number(meta.get("batches", ""), f"{path}: metadata 'batches'", CheckpointError, 1, INT64_MAX)
    by_key = {activation_key(a): a for a in activations}
    unknown = sorted(set(stats.weights) - set(by_key))
    if unknown:
        raise CheckpointError(f"{path}: {shown(unknown[0])} is not a weight input of this calibration")
    missing = sorted(set(by_key) - set(stats.weights))
    if missing:
        raise CheckpointError(f"{path} holds no sums for weight input {shown(missing[0])}")
    wanted = set(ours["statistics"])
    sums = {}
    for key, acc in stats.weights.items():
        act = by_key[key]
        if acc.sums != wanted:
            raise CheckpointError(f"{path}: the sums of {shown(key)} are not the {' and '.join(sorted(wanted))} "
                                  "this calibration collects")
        for name in acc.sums:
            if getattr(acc, name).shape != (activations[act],):
                raise CheckpointError(f"{path}: {shown(key)}:{name} has {getattr(acc, name).shape[0]} channels, "
                                      f"the input has {activations[act]}")
        sums[act] = acc
    log.info("resuming from %s: %d batches (%d samples) done", path, batches, stats.num_samples)
    return sums, stats.num_samples, batches


def check_identity(saved: object, ours: dict, where: object, *, unnamed: str, other: str,
                   differs: Mapping[str, str], options: Mapping[str, str] = {},
                   special: Mapping[str, object] = {}) -> None:
    """Raise CheckpointError unless ``saved`` (a checkpoint's identity, as read from the
    file) equals ``ours``, naming the first field that differs.

    ``unnamed``: the message when ``saved`` is not an object; ``other``: what a checkpoint
    of another identity is ("another run"); ``differs``: field -> why, in words;
    ``options``: fields that hold command-line options (field -> "another recipe"), where
    the first option that differs is named as ``--name``; ``special``: field -> function
    (theirs, ours) -> the whole message, for a field that needs its own words.
    """
    if not isinstance(saved, dict):
        raise CheckpointError(unnamed)
    for key, value in ours.items():
        theirs = saved.get(key)
        if theirs == value:
            continue
        if key in special:
            raise CheckpointError(special[key](theirs, value))
        if key in options and isinstance(theirs, dict):
            name = next((k for k in value if theirs.get(k) != value[k]), None)
            if name is not None:
                raise CheckpointError(f"{where} is a checkpoint of {options[key]}: --{name.replace('_', '-')} "
                                      f"{shown(theirs.get(name))} there, {shown(value[name])} here")
        raise CheckpointError(f"{where} is a checkpoint of {other}: {differs.get(key, f'its {key} differs')}")
    unknown = sorted(set(saved) - set(ours))
    if unknown:
        raise CheckpointError(f"{where} is a checkpoint of {other}: it names {shown(unknown[0])}")


def _check_identity(saved: object, ours: dict, path: Path) -> None:
    check_identity(saved, ours, path, unnamed=f"{path}: metadata 'identity' names no calibration",
                   other="another calibration", differs=_DIFFERS,
                   options={"data": "other options", "scope": "other options"})


def save(config: CalibrationCheckpoint, ours: dict, sums: Mapping[Activation, ChannelStats], samples: int,
         batches: int, data_config: DataConfig) -> None:
    """Write the checkpoint atomically when ``batches`` is a multiple of ``config.every``
    (not while a weight input has no rows yet: a stats file's counts are at least 1)."""
    if config.every is None or batches % config.every:
        return
    if not sums or any(acc.count < 1 for acc in sums.values()):
        log.debug("no checkpoint after batch %d: some weight input has no rows yet", batches)
        return
    stats = Stats(ours["model_sha256"], {activation_key(a): acc for a, acc in sums.items()}, samples,
                  data_config.shard, data_config.batch_size if data_config.shard else None)
    stats.save(config.path, metadata={"checkpoint": _KIND, "batches": str(batches),
                                      "identity": json.dumps(ours, sort_keys=True)})
    log.debug("checkpoint after batch %d written to %s", batches, config.path)
