"""Training checkpoints: a killed run goes on from the last one, bit for bit (``--save-every``, ``--resume``).

A checkpoint is the folder ``DIR/last`` (``DIR``: ``--save-dir``, by default
``OUTPUT.checkpoints``), written every ``--save-every`` optimizer steps by the
first process into a temporary folder beside it that then takes its place in
one rename (:func:`fps_onnx._io.atomic_folder`): a kill while writing leaves
the last complete checkpoint as it was. It holds

* ``state.safetensors``: ``trainable/<name>`` (:func:`trainable_state`: the
  deltas, the tensors trained fully, buffers such as batch-norm
  statistics), ``best/<name>`` (the same at the best epoch so far, once
  validation has chosen one), ``optimizer/<i>/<key>`` (the optimizer state of
  its i-th tensor) and ``rng/<rank>/<what>`` (each process's torch, CUDA,
  NumPy and Python generator states, and its training loader's generators as
  they were when the epoch began);
* ``record.json``: format and version; the run's identity (task, SHA-256 of the
  model's weights, of the masks and of the training and validation data, the
  recipe but ``workers``, the number of processes); the position (epoch,
  batches of it done, optimizer steps, the epoch's running sums and seconds);
  the optimizer's settings and the schedule's state; the finished epochs'
  records and the best one; the scalar parts of the generator states; and the
  SHA-256 of ``state.safetensors``.

Resuming (:class:`Checkpoints`) reads it as untrusted input and checks all of it
before anything trains: a checkpoint of another run, of another format, cut
short or changed is one :class:`~fps_onnx.errors.CheckpointError`, and nothing
is written. The loop then sets the trained state, optimizer and schedule,
replays the interrupted epoch's sample order (its loader's generators set as
they were when it began; the batches done skipped by :class:`ResumableSampler`
without being read) and sets every generator as it was at the checkpoint, so
the run goes on as if it had never stopped: on CPU the same deltas, bit for
bit, as an uninterrupted run.

Sharded training (``--fsdp``, :mod:`.fsdp`) uses this same one-file
checkpoint, not ``torch.distributed.checkpoint``: what a checkpoint must hold
is what training changes, and under FSDP all of it is replicated outside the
shards (the deltas' values and the tensors trained fully, averaged over the
processes at every step, so equal on all of them; their AdamW state, each
tensor's on one process, gathered to the first for the write), while
the sharded part, the frozen weights, never changes and is read again from
the model folder by every process at start (its SHA-256 is in the identity).
So the first process writes its own copy, and every
process reads the whole file back, each keeping its share of the AdamW state; the shards take the deltas at
the next forward pass (``base + values`` written into each process's rows). DCP would
add a second format and a collective write for state that is not sharded, and its
``FileSystemReader`` reads a checkpoint's ``.metadata`` with ``pickle.load``: resuming
from a folder of unknown origin would run whatever that file holds, where this
checkpoint is safetensors and JSON, checked before use.
``recipe.fsdp`` and the number of processes are part of the identity: a
checkpoint of a sharded run is taken up only by a sharded run of as many
processes (each process's generator states and the data position depend on
it). Should the trained state itself ever be sharded, the two methods that
write and read it, :meth:`Checkpoints._state_tensors` and
:meth:`Checkpoints._checked_state`, are the ones to replace with
``torch.distributed.checkpoint`` (see :func:`.fsdp.checkpoint_state`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
import hashlib
import itertools
import json
import logging
import math
import os
from pathlib import Path
import random
import shutil
import time

import numpy as np

from ..._io import (
    atomic_folder,
    atomic_write,
    content_digest,
    open_regular,
    read_safetensors,
    write_safetensors,
)
from ..._limits import read_json, shown, whole_number
from ...checkpoint import check_identity
from ...errors import CheckpointError, DataError, first_line
from . import sparse
from ._torch import nn, torch

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpointing", "Checkpoints", "Progress", "ResumableSampler",
           "checked_optimizer_state", "gather_optimizer_state", "group_settings", "identity", "load_trainable_state",
           "model_digest", "optimizer_tensors", "selection_digest", "trainable_state", "unwrap"]

log = logging.getLogger(__name__)

FORMAT = "fps-train-checkpoint"
FORMAT_VERSION = "1"
LAST = "last"
STATE = "state.safetensors"
RECORD = "record.json"
#: Bytes of a checkpoint's record.json read at most.
MAX_RECORD_BYTES = 16 << 20
#: Optimizer state entries a checkpoint may hold per tensor (AdamW's).
OPTIMIZER_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_MT_WORDS = 624  # words of a Mersenne Twister state (NumPy's and Python's generators)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a run saves checkpoints, and the one it goes on from."""

    every: int | None = None  # optimizer steps between checkpoints (None: none written)
    folder: str | os.PathLike | None = None  # where (None: the --resume folder, else OUTPUT.checkpoints)
    resume: str | os.PathLike | None = None  # a folder of checkpoints to go on from

    def __post_init__(self) -> None:
        if self.every is not None:
            whole_number(self.every, "--save-every", CheckpointError, 1)

    def folder_for(self, output: str | os.PathLike) -> Path:
        """The folder checkpoints are written to."""
        if self.folder is not None:
            return Path(self.folder)
        if self.resume is not None:
            return Path(self.resume)
        return Path(f"{os.fspath(output).rstrip(os.sep)}.checkpoints")


class ResumableSampler(torch.utils.data.Sampler):
    """A training sampler whose next pass can start ``skip`` samples in (the batches
    a checkpoint had done), without reading them; ``set_epoch`` is passed on."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.skip = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


@dataclass
class Progress:
    """Where a training run is: what the loops keep between steps, and a checkpoint saves."""

    epoch: int = 1  # the epoch under way (from 1)
    batch: int = 0  # its batches done
    step: int = 0  # optimizer steps done, all epochs
    totals: dict[str, float] = field(default_factory=dict)  # the epoch's running sums (loss, samples, ...)
    seconds: float = 0.0  # the epoch's training time before this process took it up
    records: list[dict] = field(default_factory=list)  # the finished epochs'
    best: int = 0  # the best epoch so far (0: none)
    best_score: float | None = None  # its validation score
    best_state: dict[str, torch.Tensor] | None = None  # its trainable_state

    def add(self, batches: int, **totals: float) -> None:
        """One optimizer step on ``batches`` batches, adding ``totals`` to the epoch's sums."""
        self.batch += batches
        self.step += 1
        for key, value in totals.items():
            self.totals[key] = self.totals.get(key, 0) + value

    def end_epoch(self, record: dict) -> None:
        self.records.append(record)
        self.epoch, self.batch, self.totals, self.seconds = self.epoch + 1, 0, {}, 0.0


def unwrap(net: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, else ``net``."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    return net.module if ddp is not None and isinstance(net, ddp) else net


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training changes: the tensors that train and the buffers (batch-norm
    statistics and counts; not the deltas' own), by plain name (a DDP wrapper unwrapped)."""
    model = unwrap(model)
    keep = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, buf in model.named_buffers():
        if sparse.plain_name(name) == name:
            keep[name] = buf.detach().clone()
    return keep


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``model``."""
    model = unwrap(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-tensor state as ``<i>/<key>`` -> tensor (i: the tensor's place in its groups).

    A ``ZeroRedundancyOptimizer`` must have gathered its state first (:func:`gather_optimizer_state`).
    """
    return {f"{i}/{key}": torch.as_tensor(value).detach().cpu()
            for i, entries in optimizer.state_dict()["state"].items() for key, value in entries.items()}


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Gather a ``ZeroRedundancyOptimizer``'s state (each process holds its share) to the first
    process, for :func:`optimizer_tensors` there; a collective: every process calls it. Nothing for
    another optimizer."""
    if hasattr(optimizer, "consolidate_state_dict"):
        optimizer.consolidate_state_dict(to=0)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings (lr, betas, ...), without its tensors."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def checked_optimizer_state(optimizer: torch.optim.Optimizer, groups: object,
                            tensors: Mapping[str, torch.Tensor], where: str) -> dict:
    """A state dict for ``optimizer.load_state_dict`` from a checkpoint's settings
    (``groups``) and tensors (``<i>/<key>``), each checked against the optimizer."""
    fresh = group_settings(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(groups, list) or len(groups) != len(fresh):
        raise CheckpointError(f"{where}: the optimizer settings are not those of this run's {len(fresh)} groups")
    loaded, first = [], 0
    for saved, group, live in zip(groups, fresh, optimizer.param_groups):
        if not isinstance(saved, dict) or set(saved) != set(group):
            raise CheckpointError(f"{where}: the optimizer settings name other entries than this run's")
        count = len(live["params"])  # a state dict names each group's tensors by their places, in order
        loaded.append({**{k: _like(saved[k], group[k], f"{where}: optimizer setting {k!r}") for k in group},
                       "params": list(range(first, first + count))})
        first += count
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, _, key = name.partition("/")
        i = whole_number(index, f"{where}: optimizer tensor {shown(name)}", CheckpointError, 0, len(params) - 1)
        if key not in OPTIMIZER_KEYS:
            raise CheckpointError(f"{where}: unexpected optimizer tensor {shown(name)}")
        want = () if key == "step" else tuple(params[i].shape)
        if tuple(value.shape) != want or not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: optimizer tensor {shown(name)} must be finite float {list(want)}, "
                                  f"not {value.dtype} {list(value.shape)}")
        state.setdefault(i, {})[key] = value
    for i, entries in state.items():
        if not {"step", "exp_avg", "exp_avg_sq"} <= set(entries):
            raise CheckpointError(f"{where}: the optimizer state of tensor {i} is incomplete")
    return {"state": state, "param_groups": loaded}


def _like(value: object, fresh: object, what: str) -> object:
    """``value`` (read from JSON) as the type of ``fresh``, this run's own value of it."""
    if isinstance(fresh, bool) or fresh is None or isinstance(fresh, str):
        ok = type(value) is type(fresh)
    elif isinstance(fresh, int):
        ok = type(value) is int
    elif isinstance(fresh, float):
        ok = type(value) in (int, float) and math.isfinite(value)
        value = float(value) if ok else value
    elif isinstance(fresh, (tuple, list)):
        ok = isinstance(value, list) and len(value) == len(fresh)
        if ok:
            value = type(fresh)(_like(v, f, what) for v, f in zip(value, fresh))
    else:
        ok = False
    if not ok:
        raise CheckpointError(f"{what} must be like this run's {shown(fresh)}, not {shown(value)}")
    return value


def model_digest(model: nn.Module) -> str:
    """Hex SHA-256 of a model's state: each tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def selection_digest(model: nn.Module) -> str:
    """Hex SHA-256 of the entries that train: each sparse weight's name and flat indices, by name."""
    digest = hashlib.sha256()
    for name, delta in sorted(sparse.unique_deltas(unwrap(model)).items()):
        digest.update(f"{name}\0{delta.indices.numel()}\0".encode())
        digest.update(delta.indices.detach().cpu().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def identity(task: str, model_sha256: str, model: nn.Module,
             data: Mapping[str, str | os.PathLike | None], recipe, world_size: int, **more) -> dict:
    """What makes a run the same run: a checkpoint is resumed only by a run of the same identity.

    ``model``: the prepared model (its deltas' indices: the masks as attached); ``data``: split name -> path (its :func:`fps_onnx._io.content_digest`);
    ``recipe``: its fields but ``workers``; ``more``: anything else that shapes the run.
    """
    return json.loads(json.dumps({
        "task": task,
        "model_sha256": model_sha256,
        "masks_sha256": selection_digest(model),
        "data_sha256": {k: content_digest(v, DataError) if v is not None else None for k, v in data.items()},
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "workers"},
        "world_size": world_size,
        **more,
    }))


_DIFFERS = {
    "task": "it trains another --task",
    "model_sha256": "it is of another model (its weights differ)",
    "masks_sha256": "it is of other masks (another selection or budget)",
    "data_sha256": "it is of other training or validation data",
    "step_scale_sha256": "its steps were scaled by other factors (other --step-scale statistics), or not scaled",
}


def _check_identity(saved: object, ours: dict, folder: Path) -> None:
    check_identity(
        saved, ours, folder, unnamed=f"{folder}: the checkpoint's record names no run", other="another run",
        differs=_DIFFERS, options={"recipe": "another recipe"},
        special={"world_size": lambda theirs, value: f"{folder} was written by a run of {shown(theirs)} processes, "
                 f"this one has {value}: resume with as many (--nproc_per_node)"})


def _read(folder: Path, ours: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors) of the checkpoint in ``folder``, its format, identity and
    file checked (CheckpointError otherwise)."""
    where = folder / LAST
    if not where.is_dir():
        raise CheckpointError(f"{folder} holds no checkpoint ({LAST}/ is missing): give --resume "
                              "the folder --save-dir named")
    with open_regular(where / RECORD, CheckpointError, "checkpoint record") as fh:
        data = fh.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise CheckpointError(f"{where / RECORD} is larger than {MAX_RECORD_BYTES:,} bytes")
    record = read_json(data, str(where / RECORD), CheckpointError)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{where / RECORD} is not an fps-onnx training checkpoint")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where} has checkpoint format version {shown(record.get('format_version'))}, "
                              f"this fps-onnx reads {FORMAT_VERSION}")
    _check_identity(record.get("identity"), ours, folder)
    files = record.get("files")
    if not isinstance(files, dict) or files.get(STATE) != content_digest(where / STATE, CheckpointError):
        raise CheckpointError(f"{where / STATE} is damaged: its SHA-256 is not the one its record holds "
                              "(cut short or changed)")
    tensors, _ = read_safetensors(where / STATE, FORMAT, FORMAT_VERSION, CheckpointError, "checkpoint",
                                  framework="pt")
    return record, tensors


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_like(got: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor], what: str) -> None:
    """CheckpointError unless ``got`` holds exactly the tensors of ``live``: names, dtypes, shapes, finite."""
    missing = sorted(set(live) - set(got))
    if missing:
        raise CheckpointError(f"{what}: tensor {shown(missing[0])} is missing (masks or recipe of another run?)")
    unknown = sorted(set(got) - set(live))
    if unknown:
        raise CheckpointError(f"{what}: unexpected tensor {shown(unknown[0])}")
    for name, value in got.items():
        want = live[name]
        if value.dtype != want.dtype or value.shape != want.shape:
            raise CheckpointError(f"{what}: {shown(name)} is {value.dtype} {list(value.shape)}, "
                                  f"the model's is {want.dtype} {list(want.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{what}: {shown(name)} holds NaN or Inf")


def _finite(value: object) -> object:
    """``value`` with every float that is not finite made None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _loader_generators(loader) -> list[torch.Generator]:
    """The generators a training loader draws from: its own and its sampler's (once each)."""
    sampler = getattr(loader, "sampler", None)
    inner = sampler.inner if isinstance(sampler, ResumableSampler) else sampler
    found: list[torch.Generator] = []
    for gen in (getattr(loader, "generator", None), getattr(inner, "generator", None)):
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _rng_state(device: torch.device, loader_states: list[torch.Tensor]) -> dict:
    """This process's generator states: tensors, and the scalars beside them."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(words, dtype=torch.int64)}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    tensors |= {f"loader{i}": s for i, s in enumerate(loader_states)}
    return {"tensors": tensors, "scalars": {"numpy": [int(pos), int(has_gauss), float(cached)],
                                            "python": [version, gauss]}}


def _checked_rng(tensors: Mapping[str, torch.Tensor], scalars: object, device: torch.device,
                 loaders: int, where: str) -> dict:
    """One process's generator states from a checkpoint, each checked before any is set."""
    expect = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                                 if device.type == "cuda" else {})}
    expect |= {f"loader{i}": torch.get_rng_state() for i in range(loaders)}
    if set(tensors) != set(expect) | {"numpy", "python"}:
        raise CheckpointError(f"{where}: the generator states are not this run's (another device or loader?)")
    for name, like in expect.items():
        if tensors[name].dtype != torch.uint8 or tensors[name].shape != like.shape:
            raise CheckpointError(f"{where}: generator state {name} is not a torch generator's")
        if name != "cuda":
            try:  # a scratch generator takes it first
                torch.Generator().set_state(tensors[name])
            except RuntimeError as exc:
                raise CheckpointError(f"{where}: generator state {name} is not valid ({first_line(exc)})") from None
    for name, size in (("numpy", _MT_WORDS), ("python", _MT_WORDS + 1)):
        words = tensors[name]
        if words.dtype != torch.int64 or tuple(words.shape) != (size,) or bool(
                ((words[:_MT_WORDS] < 0) | (words[:_MT_WORDS] >= 1 << 32)).any()):
            raise CheckpointError(f"{where}: generator state {name} is not a Mersenne Twister's")
    ok = isinstance(scalars, dict) and isinstance(scalars.get("numpy"), list) and isinstance(
        scalars.get("python"), list) and len(scalars["numpy"]) == 3 and len(scalars["python"]) == 2
    if ok:
        (pos, has_gauss, cached), (version, gauss) = scalars["numpy"], scalars["python"]
        ok = (type(pos) is int and 0 <= pos <= _MT_WORDS and has_gauss in (0, 1) and type(has_gauss) is int
              and isinstance(cached, (int, float)) and version == random.getstate()[0]
              and (gauss is None or isinstance(gauss, float)) and 0 <= int(tensors["python"][-1]) <= _MT_WORDS)
    if not ok:
        raise CheckpointError(f"{where}: the generator states' scalars are not valid")
    state = {"tensors": dict(tensors), "scalars": scalars}
    try:  # scratch generators take them first
        _set_rng(state, device, np.random.RandomState(), random.Random())
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: the generator states are not valid ({first_line(exc)})") from None
    return state


def _set_rng(state: dict, device: torch.device, numpy_rng=np.random, python_rng=random) -> None:
    """Set the generators from ``state``: torch's and CUDA's only with the global NumPy and
    Python ones (other ``numpy_rng``, ``python_rng``: scratch ones, to check the state)."""
    tensors, scalars = state["tensors"], state["scalars"]
    pos, has_gauss, cached = scalars["numpy"]
    numpy_rng.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, float(cached)))
    version, gauss = scalars["python"]
    python_rng.setstate((version, tuple(int(w) for w in tensors["python"].tolist()), gauss))
    if numpy_rng is np.random:
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors:
            torch.cuda.set_rng_state(tensors["cuda"], device)


class Checkpoints:
    """A training run's checkpoints: the one it goes on from, and those it writes.

    ``identity``: :func:`identity` of this run; ``output``: its output folder
    (the default checkpoint folder is named after it). With ``config.resume``
    the checkpoint is read and checked at once, against the live model,
    optimizer and schedule in :meth:`resume`. The loops call :meth:`resume`
    before the first epoch, iterate :meth:`batches` each epoch and call
    :meth:`step_done` after each optimizer step.
    """

    def __init__(self, config: Checkpointing, identity: dict, output: str | os.PathLike, *, rank: int = 0,
                 world: int = 1, device: torch.device | str = "cpu") -> None:
        self.every = config.every
        self.folder = config.folder_for(output)
        self.identity = identity
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self._loaded = None if config.resume is None else _read(Path(config.resume), identity)
        self._resume_from = config.resume
        self._pending_rng: dict | None = None
        self._epoch_states: list[torch.Tensor] = []
        self._started = time.perf_counter()

    @classmethod
    def off(cls) -> Checkpoints:
        """Neither written nor read."""
        return cls(Checkpointing(), {}, ".")

    # ------------------------------------------------------------------ resuming

    def resume(self, net: nn.Module, optimizer, schedule, loader, progress: Progress, *, epochs: int) -> Progress:
        """Set ``net``, ``optimizer``, ``schedule`` and ``progress`` from the checkpoint
        (every part checked first); ``progress`` unchanged when not resuming."""
        if self._loaded is None:
            return progress
        record, tensors = self._loaded
        where = f"checkpoint {self._resume_from}"
        trained, best, opt_state = self._checked_state(net, optimizer, record, tensors, where)
        sched = self._checked_schedule(schedule, record.get("schedule"), where)
        position, history = self._checked_position(record, loader, epochs, where)
        rng = record.get("rng")
        if not isinstance(rng, list) or len(rng) != self.world:
            raise CheckpointError(f"{where}: the generator states are not those of {self.world} processes")
        states = [_checked_rng(_prefixed(tensors, f"rng/{r}/"), rng[r], self.device,
                               len(_loader_generators(loader)), where) for r in range(self.world)]
        known = {"trainable/", "best/", "optimizer/", *(f"rng/{r}/" for r in range(self.world))}
        stray = sorted(k for k in tensors if not any(k.startswith(p) for p in known))
        if stray:
            raise CheckpointError(f"{where}: unexpected tensor {shown(stray[0])}")

        load_trainable_state(net, trained)
        optimizer.load_state_dict(opt_state)
        schedule.load_state_dict(sched)
        progress.epoch, progress.batch, progress.step = position["epoch"], position["batch"], position["step"]
        progress.totals, progress.seconds = position["totals"], position["seconds"]
        progress.records, progress.best, progress.best_score = history
        progress.best_state = best or None
        self._pending_rng = states[self.rank]
        self._loaded = None
        log.info("resuming from %s: epoch %d, batch %d, step %d", self._resume_from, progress.epoch,
                 progress.batch, progress.step)
        return progress

    @staticmethod
    def _checked_state(net: nn.Module, optimizer, record: dict, tensors: Mapping[str, torch.Tensor], where: str
                       ) -> tuple[dict, dict, dict]:
        """(trained state, best epoch's state, optimizer state dict) read back, each checked
        against the live ones: the part a sharded run reads otherwise (see the module docstring)."""
        live = trainable_state(net)
        trained = _prefixed(tensors, "trainable/")
        _check_like(trained, live, where)
        best = _prefixed(tensors, "best/")
        if best:
            _check_like(best, live, where)
        return trained, best, checked_optimizer_state(optimizer, record.get("optimizer"),
                                                      _prefixed(tensors, "optimizer/"), where)

    @staticmethod
    def _checked_schedule(schedule, saved: object, where: str) -> dict:
        fresh = schedule.state_dict()
        lambdas = fresh.pop("lr_lambdas", None)
        if not isinstance(saved, dict) or set(saved) != set(fresh):
            raise CheckpointError(f"{where}: the schedule's state is not that of this run's schedule")
        state = {k: _like(saved[k], fresh[k], f"{where}: schedule entry {k!r}") for k in fresh}
        return state | ({"lr_lambdas": lambdas} if lambdas is not None else {})

    @staticmethod
    def _checked_position(record: dict, loader, epochs: int, where: str) -> tuple[dict, tuple]:
        position, history = record.get("position"), record.get("history")
        if not isinstance(position, dict) or not isinstance(history, dict):
            raise CheckpointError(f"{where}: the record holds no position")
        epoch = whole_number(position.get("epoch"), f"{where}: epoch", CheckpointError, 1, epochs)
        batch = whole_number(position.get("batch"), f"{where}: batch", CheckpointError, 0, len(loader))
        step = whole_number(position.get("step"), f"{where}: step", CheckpointError, 0, epochs * len(loader))
        totals, seconds = position.get("totals"), position.get("seconds")
        if not isinstance(totals, dict) or not all(
                type(v) in (int, float) and math.isfinite(v) for v in totals.values()):
            raise CheckpointError(f"{where}: the epoch's running sums are not numbers")
        if type(seconds) not in (int, float) or not 0 <= seconds < math.inf:
            raise CheckpointError(f"{where}: the epoch's seconds are not a number")
        records, best, score = history.get("records"), history.get("best"), history.get("best_score")
        if not isinstance(records, list) or len(records) != epoch - 1 or not all(
                isinstance(r, dict) for r in records):
            raise CheckpointError(f"{where}: the record of finished epochs does not fit epoch {epoch}")
        best = whole_number(best, f"{where}: best epoch", CheckpointError, 0, epoch - 1)
        if score is not None and (type(score) not in (int, float) or not math.isfinite(score)):
            raise CheckpointError(f"{where}: the best validation score is not a number")
        return ({"epoch": epoch, "batch": batch, "step": step, "totals": totals, "seconds": float(seconds)},
                (records, best, score))

    # ------------------------------------------------------------------ each epoch

    def batches(self, loader, progress: Progress):
        """An iterator over the epoch's batches: all of them, or, in the epoch a
        checkpoint interrupted, those it had not done, in the same order; every
        generator is then as it was at the checkpoint."""
        gens = _loader_generators(loader)
        pending, self._pending_rng = self._pending_rng, None
        if pending is not None:
            states = [pending["tensors"][f"loader{i}"] for i in range(len(gens))]
            for gen, state in zip(gens, states):
                gen.set_state(state)
            if progress.batch:
                if not isinstance(loader.sampler, ResumableSampler):
                    raise CheckpointError("this training loader cannot resume mid-epoch (no ResumableSampler)")
                loader.sampler.skip = progress.batch * loader.batch_size
            self._epoch_states = states
        else:
            self._epoch_states = [gen.get_state() for gen in gens]
        self._started = time.perf_counter()
        batches = iter(loader)
        if pending is not None:
            _set_rng(pending, self.device)
        return batches

    def step_done(self, net: nn.Module, optimizer, schedule, progress: Progress) -> None:
        """Save a checkpoint when ``progress.step`` is a multiple of ``every``."""
        if self.every is not None and progress.step % self.every == 0:
            self.save(net, optimizer, schedule, progress)

    # ------------------------------------------------------------------ writing

    @staticmethod
    def _state_tensors(net: nn.Module, optimizer, progress: Progress) -> dict[str, torch.Tensor]:
        """The trained state to save (``trainable/``, ``best/``, ``optimizer/``): the part a
        sharded run writes otherwise (see the module docstring)."""
        tensors = {f"trainable/{k}": v for k, v in trainable_state(net).items()}
        tensors |= {f"best/{k}": v for k, v in (progress.best_state or {}).items()}
        return tensors | {f"optimizer/{k}": v for k, v in optimizer_tensors(optimizer).items()}

    def save(self, net: nn.Module, optimizer, schedule, progress: Progress) -> None:
        """Write ``DIR/last`` (every process takes part: the generator states are gathered)."""
        rng = _rng_state(self.device, self._epoch_states)
        gather_optimizer_state(optimizer)
        ranks = [rng]
        if self.world > 1:
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, rng)
        if self.rank != 0:
            return
        tensors = self._state_tensors(net, optimizer, progress)
        for r, state in enumerate(ranks):
            tensors |= {f"rng/{r}/{k}": v for k, v in state["tensors"].items()}
        schedule_state = schedule.state_dict()
        schedule_state.pop("lr_lambdas", None)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "identity": self.identity,
            "position": {"epoch": progress.epoch, "batch": progress.batch, "step": progress.step,
                         "totals": progress.totals,
                         "seconds": progress.seconds + time.perf_counter() - self._started},
            "history": _finite({"records": progress.records, "best": progress.best,
                                "best_score": progress.best_score}),
            "optimizer": group_settings(optimizer),
            "schedule": schedule_state,
            "rng": [state["scalars"] for state in ranks],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f".{LAST}.*.tmp"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_folder(self.folder / LAST) as tmp:
            write_safetensors(tmp / STATE, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                              {"format": FORMAT, "format_version": FORMAT_VERSION}, framework="pt")
            record["files"] = {STATE: content_digest(tmp / STATE, CheckpointError)}
            text = json.dumps(record, indent=1, allow_nan=False, default=str)
            atomic_write(tmp / RECORD, lambda f: Path(f).write_text(text))
        log.info("checkpoint at step %d written to %s", progress.step, self.folder / LAST)
