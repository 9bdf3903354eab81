"""Sparse fine-tuning sharded over processes (``train --fsdp``, PyTorch FSDP2).

Under ``torchrun --nproc_per_node N`` (:func:`shard`):

* every weight matrix of a transformer block (the blocks: the model's
  ``_no_split_modules`` classes, else the members of its largest list of
  same-class blocks), then each block (its norms), the input embedding, the
  output head (unless tied to it) and then the rest (final norm) become
  ``fully_shard`` units over a one-dimensional ``DeviceMesh``: each process
  holds 1/N of every frozen weight's rows, and a whole weight only while it
  computes (one matrix at a time: FSDP holds a unit's gathered weights beside
  the buffer they were gathered into, so the peak grows by twice the largest
  unit);
* a causal LM's frozen, untied input embedding and output head are never
  gathered: their rows stay sharded as FSDP shards them, and each is used a
  chunk of rows at a time, each chunk broadcast by the process holding it
  (:class:`RowShardedEmbedding`, :class:`RowShardedHead`). A vocabulary of
  32,000 x 2,048 in fp32 is 262 MB, which FSDP would hold twice while gathering;
* what trains (each delta's k values, and any tensor trained fully) stays out
  of FSDP (``ignored_params``): replicated on every process; its gradient is
  averaged over the processes in the backward pass (one all-reduce of each
  k-sized tensor, as DistributedDataParallel does). Replicated because it is
  small (k is about 1 % of the weights) and because then every process holds
  the values its own rows need, with no communication; the schedule of
  :mod:`.loop` runs unchanged, clipping sums the norm over the processes, and
  rank 0 writes the delta file from its own tensors. Its AdamW state (twice its size) and gradients are not
  replicated: each process keeps those of its share of the tensors only, steps
  that share and broadcasts the new values (``ZeroRedundancyOptimizer``,
  :func:`.loop.make_optimizer`);
* the weights stay merged in the shards: before each forward pass every
  process writes ``base + values`` (fp32, cast once) into the selected entries
  of its own rows, so the weight FSDP all-gathers for a block's forward pass,
  and again for its backward pass, is ``W0 + delta``. The deltas' indices are
  flat indices into the full weight; a shard of rows r0..r1 holds the indices
  in ``[r0 * columns, r1 * columns)``. The sparse Linear forward and backward
  (no dense weight gradient) then run on the all-gathered weight as they do on
  one process.

A causal LM is built without its weights (:func:`meta_causal_lm`), sharded,
and each process reads only its own rows of every weight from the folder's
safetensors files, so no process holds a full copy of the model. Other models
are built whole on every process and then sharded.

``train --save-every`` / ``--resume`` need nothing of this module: what trains
is replicated, so :mod:`.checkpoint`'s one-file checkpoint serves (see there).
For a training loop of one's own: :func:`gather_trainable` (the full trainable state, on every
process) and :func:`checkpoint_state` / :func:`load_checkpoint_state` (a state
dict of the trainable tensors and the optimizer for
``torch.distributed.checkpoint``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import logging
import os
from pathlib import Path

from ...errors import DataError, ExportError
from .. import hf
from . import sparse
from ._torch import nn, torch
from .recipe import RecipeError

__all__ = ["RowShardedEmbedding", "RowShardedHead", "block_modules", "check_world", "checkpoint_state", "delta_indices",
    "gather_trainable", "is_unit", "load_checkpoint_state", "load_trainable", "load_weights", "meta_causal_lm",
    "release", "shard"]

log = logging.getLogger(__name__)



def check_world(world: int, samples: int | None = None) -> None:
    """RecipeError unless several processes run (torchrun); DataError when the training
    split has fewer samples than there are processes."""
    if world < 2:
        raise RecipeError("--fsdp shards the model over several processes: run it under "
                          "torchrun --nproc_per_node N with N >= 2")
    if samples is not None and samples < world:
        raise DataError(f"the training split holds {samples} samples, fewer than the {world} processes "
                        "it is divided over")


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: the model's ``_no_split_modules`` classes (outermost
    ones), else the members of its largest ModuleList/Sequential of same-class modules."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or module is model or type(module).__name__ not in names:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    if found:
        return found
    best, size = [], 0
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        total = sum(p.numel() for p in module.parameters())
        if total > size:
            best, size = children, total
    return best


def _embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output head (a transformers model's) as units of their own,
    so that each is whole only around its own use; tied, they stay in the root's unit."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return []
    found = [m for m in (get_in(), get_out()) if isinstance(m, nn.Module)]
    if len(found) == 2 and {id(p) for p in found[0].parameters()} & {id(p) for p in found[1].parameters()}:
        return []
    return found


def _weight_modules(block: nn.Module) -> list[nn.Module]:
    """The modules inside ``block`` that hold a weight matrix (Linear, Conv1D, ...; outermost
    ones), each made a unit of its own: FSDP holds a unit's gathered weights beside the buffer
    they were all-gathered into, so a process's peak grows by twice its largest unit."""
    from torch.nn.utils import parametrize

    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in block.modules():
        if module is block or id(module) in inside:
            continue
        own = list(module.parameters(recurse=False))
        if parametrize.is_parametrized(module):
            own += [plist.original for plist in module.parametrizations.values()]
        if any(p.ndim >= 2 for p in own):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def _row_sharded_units(model: nn.Module) -> list[nn.Module]:
    """The input embedding (an nn.Embedding) and output head (a bias-free nn.Linear) of a transformers
    causal LM to leave out of FSDP (:class:`RowShardedEmbedding`, :class:`RowShardedHead`): each
    frozen and not tied to the other; the rest stay units FSDP gathers whole."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return []
    embedding, head = get_in(), get_out()
    if isinstance(embedding, nn.Module) and isinstance(head, nn.Module) and \
            {id(p) for p in embedding.parameters()} & {id(p) for p in head.parameters()}:
        return []
    found = []
    if type(embedding) is nn.Embedding and embedding.max_norm is None and not embedding.weight.requires_grad:
        found.append(embedding)
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        found.append(head)
    return found


#: Bytes of a row-sharded weight a process receives at a time (:class:`RowShardedEmbedding`,
#: :class:`RowShardedHead`). The head computes where a process's memory peaks (the end of the forward
#: pass, the start of the backward: every activation held), so its chunk is kept small: 8 MB adds
#: little to that peak (32 MB raised a 1.1 B Llama's bf16 peak by 24 MB: benchmarks/fsdp_memory.py)
#: and is still large enough that the broadcasts' count does not show in the step time.
ROW_CHUNK_BYTES = 1 << 23


class _RowSharded(nn.Module):
    """A frozen weight that stays sharded by rows over the processes (a DTensor sharded on dim 0,
    as FSDP shards, read by :func:`_load_shards` like the others) and is used a chunk of
    :data:`ROW_CHUNK_BYTES` at a time, each chunk broadcast by the process that holds it: no
    process holds the whole weight, which FSDP would all-gather (a vocabulary of 32,000 x 2,048 in
    fp32 is 262 MB, held twice while it is gathered)."""

    def __init__(self, weight: nn.Parameter, mesh) -> None:
        from torch.distributed.tensor import DTensor, Shard

        super().__init__()
        placements = [Shard(0)]
        first, rows = _span(weight.shape, mesh, placements)
        local = torch.empty((rows, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
        self.weight = nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False,
                                                      shape=weight.shape, stride=weight.stride()),
                                   requires_grad=False)
        spans = torch.zeros(torch.distributed.get_world_size(), 2, dtype=torch.int64)
        spans[torch.distributed.get_rank()] = torch.tensor([first, rows])
        torch.distributed.all_reduce(spans)
        self.spans = [(int(a), int(b)) for a, b in spans.tolist()]  # each process's (first row, rows)
        self.chunk_rows = max(1, ROW_CHUNK_BYTES // max(1, weight[0].numel() * weight.element_size()))

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        return _row_chunks(self.weight.to_local(), self.spans, self.chunk_rows)


class RowShardedHead(_RowSharded):
    """A bias-free Linear output head of row shards: the logits are computed a chunk of rows at a time,
    and so is the backward pass to the hidden states; they are the whole head's logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _RowShardedLinear.apply(hidden, self.weight.to_local(), self.spans, self.chunk_rows)


class RowShardedEmbedding(_RowSharded):
    """A frozen input embedding of row shards: each token's row is taken from the chunk holding it."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        total = self.spans[-1][0] + self.spans[-1][1] if self.spans else 0
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= total):
            raise IndexError(f"token ids must lie in [0, {total}) of the embedding")
        out = None
        for first, chunk in self.chunks():
            if out is None:
                out = torch.empty((*ids.shape, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
            hit = (ids >= first) & (ids < first + len(chunk))
            out[hit] = chunk[ids[hit] - first]
        return out


def _row_chunks(local: torch.Tensor, spans, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, chunk) of the whole weight, a chunk at a time, each broadcast by the process holding
    it (the same order on every process)."""
    rank = torch.distributed.get_rank()
    for owner, (first, rows) in enumerate(spans):
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            chunk = local[start:start + n] if owner == rank else \
                torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
            torch.distributed.broadcast(chunk, src=owner)
            yield first + start, chunk


class _RowShardedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, local, spans, chunk_rows):
        ctx.spans, ctx.chunk_rows, ctx.dtype = spans, chunk_rows, hidden.dtype
        ctx.save_for_backward(local)
        return torch.cat([nn.functional.linear(hidden, chunk) for _, chunk in _row_chunks(local, spans, chunk_rows)],
                         dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (local,) = ctx.saved_tensors
        out, column = None, 0
        for _, chunk in _row_chunks(local, ctx.spans, ctx.chunk_rows):
            # each chunk's product in the gradient's dtype, as one matmul of the whole head would be;
            # their sum in fp32, so that a half gradient is rounded once, not once per chunk
            part = grad[..., column:column + len(chunk)] @ chunk.to(grad.dtype)
            out = part.float() if out is None else out.add_(part)
            column += len(chunk)
        return out.to(ctx.dtype), None, None, None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a meta one is kept: ties stay ties
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_causal_lm(folder: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The causal LM of a checked transformers ``folder`` (see ``hf_folder.causal_lm_folder``),
    its parameters on the meta device in ``dtype``: no memory until :func:`shard` loads them."""
    with _parameters_on_meta():
        model = hf.model_from_config("AutoModelForCausalLM", folder, dtype=dtype)
    return model.eval()


def shard(model: nn.Module, device: torch.device, *, folder: str | os.PathLike | None = None) -> nn.Module:
    """Shard a prepared model (:func:`fps_onnx.torch.train.loop.prepare`) over the process group.

    ``folder``: the transformers folder to read the weights from when ``model``
    came from :func:`meta_causal_lm`. Returns ``model`` (now FSDP modules).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ignored = set(trainable)
    by_rows = _row_sharded_units(model) if folder is not None else []  # built on meta: nothing to move
    for block in block_modules(model):
        for unit in _weight_modules(block):
            fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)
    for unit in _embeddings(model):
        if unit not in by_rows:
            fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)
    for unit in by_rows:
        if unit is model.get_input_embeddings():
            model.set_input_embeddings(RowShardedEmbedding(unit.weight, mesh))
            ignored.add(model.get_input_embeddings().weight)
        else:
            model.set_output_embeddings(RowShardedHead(unit.weight, mesh))
            ignored.add(model.get_output_embeddings().weight)
    # the root too reshards after its forward pass, so that the weights' shards are what
    # every module holds between passes (where _write_shards writes the deltas)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)
    if folder is not None:
        _materialize(model, device)
        _load_shards(model, Path(folder))
    _move_replicated(model, device)
    _fill_bases(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # materialised: new tensors
    for param in trainable:
        param.register_hook(_average(world))
    model.register_forward_pre_hook(_ShardWriter(model), prepend=True)
    log.info("sharded %d blocks and the rest over %d processes; %d trainable tensors replicated",
             len(block_modules(model)), world, len(trainable))
    return model


def load_weights(model: nn.Module, folder: str | os.PathLike, device: torch.device) -> None:
    """Give a prepared :func:`meta_causal_lm` model that stays whole (one process) its weights from
    ``folder``, one tensor at a time, each cast to its parameter's dtype on the way: a half base never
    holds the checkpoint's fp32 copy (as loading it whole with a dtype does)."""
    _materialize(model, device)
    _load_shards(model, Path(folder))
    _fill_bases(model)


def _average(world: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad.div_(world)

    return hook


def is_unit(module: object) -> bool:
    """Whether ``module`` is a ``fully_shard`` unit (its weights gathered on every use)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without torch.distributed
        return False
    return isinstance(module, FSDPModule)


def _is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _rows(param) -> tuple[int, int]:
    """(first row, rows) of this process's shard of a DTensor parameter sharded on dim 0."""
    return _span(param.shape, param.device_mesh, param.placements)


def _span(shape, mesh, placements) -> tuple[int, int]:
    """(first row, rows) of this process's shard of a tensor of ``shape`` placed on ``mesh``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return (int(offset[0]) if local[0] else 0), int(local[0])


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Storage for the meta parameters (their values come later), keeping every real tensor."""
    keep = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
            if not _is_sharded(t) and t.device.type != "meta"}
    tied = sparse.tied_names(model)
    model.to_empty(device=device)
    for name, group in tied.items():  # to_empty made each module's copy of a tied tensor its own
        first = model.get_parameter(group[0])
        if name != group[0] and not _is_sharded(first):
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, first)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in keep.items():
            tensors[name].copy_(value)


def _move_replicated(model: nn.Module, device: torch.device) -> None:
    """Plain (unsharded) parameters and buffers onto ``device``."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is not None and not _is_sharded(tensor) and tensor.device != device:
                    tensor.data = tensor.data.to(device)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Weight name -> safetensors file of a transformers folder (its index, else
    model.safetensors), as :func:`fps_onnx.torch.hf.weight_headers` reads and checks them."""
    headers = hf.weight_headers(folder)
    if headers is None:
        raise ExportError(f"--fsdp reads the weights from safetensors files: {folder} holds neither "
                          f"{hf.WEIGHTS_FILE} nor {hf.WEIGHTS_INDEX}")
    return {name: stored.file for name, stored in headers.items()}


def _load_shards(model: nn.Module, folder: Path) -> None:
    """Each parameter's rows of this process (the whole of a replicated one) from ``folder``."""
    from safetensors import SafetensorError, safe_open

    files = _weight_files(folder)
    wanted: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        plain = sparse.plain_name(name) if not param.requires_grad or sparse.plain_name(name) == name else None
        if plain is None:
            continue  # a delta's values: zero at the start
        if plain not in files:
            raise ExportError(f"{folder} holds no weight {plain!r} of {type(model).__name__}")
        wanted.setdefault(files[plain], []).append((plain, param))
    try:
        for path, params in wanted.items():
            for key, param in params:
                # one mapping per tensor: the file's pages this process read leave its memory with it
                with safe_open(str(path), framework="pt") as handle:
                    part = handle.get_slice(key)
                    if tuple(part.get_shape()) != tuple(param.shape):
                        raise ExportError(f"{path}: {key} has shape {list(part.get_shape())}, the model's is "
                                          f"{list(param.shape)}")
                    with torch.no_grad():
                        if _is_sharded(param):
                            first, rows = _rows(param)
                            if rows:
                                param.to_local().copy_(part[first:first + rows])
                        else:
                            param.copy_(part[:])
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"cannot read the weights of {folder}: {exc}") from exc


def _original(model: nn.Module, name: str):
    module_name, _, tensor_name = name.rpartition(".")
    return model.get_submodule(module_name).parametrizations[tensor_name].original


def _local_entries(param, indices: torch.Tensor) -> tuple[slice, torch.Tensor]:
    """(the span of ``indices`` this process's shard holds, their flat indices into the shard).

    The indices are sorted (:class:`.sparse.SparseDelta`), so a shard's entries are one span of
    them; their local indices are int32 when the shard allows (half the memory of int64, kept
    for the run by :class:`_ShardWriter`).
    """
    first, rows = _rows(param)
    columns = param[0].numel() if param.ndim > 1 else 1
    low, high = first * columns, (first + rows) * columns
    bounds = torch.tensor([low, high], dtype=indices.dtype, device=indices.device)
    start, stop = (int(i) for i in torch.searchsorted(indices, bounds))
    small = rows * columns <= torch.iinfo(torch.int32).max
    return slice(start, stop), (indices[start:stop] - low).to(torch.int32 if small else torch.int64)


def _fill_bases(model: nn.Module) -> None:
    """Each delta's ``base`` (the weight's entries at its indices), from the shards that hold them."""
    for name, delta in sparse.unique_deltas(model).items():
        param = _original(model, name)
        if not _is_sharded(param):
            delta.base.copy_(param.detach().reshape(-1).take(delta.flat()).to(delta.base.dtype))
            continue
        span, local = _local_entries(param, delta.indices)
        gathered = torch.zeros(delta.indices.numel(), dtype=torch.float32, device=delta.base.device)
        gathered[span] = param.to_local().reshape(-1)[local].to(torch.float32)
        torch.distributed.all_reduce(gathered)  # every entry lives in exactly one shard
        delta.base.copy_(gathered.to(delta.base.dtype))


class _ShardWriter:
    """Forward pre-hook of the root: ``base + values`` into each process's shard of each weight."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entries: dict[int, tuple[slice, torch.Tensor]] = {}

    def __call__(self, module, args) -> None:
        for name, delta in sparse.unique_deltas(self.model).items():
            param = _original(self.model, name)
            if not _is_sharded(param):  # not sharded (yet): the forward pass writes the whole weight
                continue
            if id(delta) not in self.entries:
                self.entries[id(delta)] = _local_entries(param, delta.indices)
            span, local = self.entries[id(delta)]
            if not local.numel():
                continue
            with torch.no_grad():
                shard_ = param.to_local()
                merged = delta.base[span].to(delta.values.dtype) + delta.values[span]
                shard_.view(-1).index_put_((local,), merged.to(shard_.dtype))


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor's full value on the CPU, by parameter name (delta values included).

    A collective when some of them are sharded: every process calls it; each gets the whole.
    """
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if _is_sharded(param) else param
            out[name] = value.detach().to("cpu", copy=True)
    return out


def release(model: nn.Module) -> None:
    """Free the rows of every sharded weight of a model whose training is over (its trainable
    tensors taken first: :func:`gather_trainable`, ``delta.trained``), so that no process holds
    them while rank 0 writes the outputs. FSDP's hooks hold a model with nested units in
    references ``gc`` does not clear, so dropping the model does not return its shards."""
    for param in model.parameters():
        if _is_sharded(param):
            param.to_local().untyped_storage().resize_(0)


def delta_indices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each sparse weight's name -> its delta's flat indices (CPU), tied weights once."""
    return {name: delta.indices.cpu() for name, delta in sparse.unique_deltas(model).items()}


def load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy :func:`gather_trainable`'s tensors into a model prepared the same way (plain or sharded)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra = sorted(set(state) ^ set(params))
        raise ExportError(f"the trainable tensors differ from the model's ({extra[0]!r} is in one only)")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ExportError(f"{name} has shape {list(state[name].shape)}, the model's is {list(param.shape)}")
            target = param.to_local() if _is_sharded(param) else param
            value = state[name]
            if _is_sharded(param):
                first, rows = _rows(param)
                value = value[first:first + rows]
            target.copy_(value)


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"model": trainable tensors, "optimizer": its state}`` for ``torch.distributed.checkpoint``,
    of a loop's own plain optimizer (``train --fsdp``'s ``ZeroRedundancyOptimizer`` is saved by
    :mod:`.checkpoint`).

    The frozen weights are left out (they are the base model's). Save with
    ``dcp.save(checkpoint_state(model, opt), checkpoint_id=DIR)``; resume with
    ``state = checkpoint_state(model, opt); dcp.load(state, checkpoint_id=DIR);
    load_checkpoint_state(model, opt, state)``. ``dcp.load`` reads the folder's ``.metadata``
    with ``pickle``: load only folders your own runs wrote.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optim_state}


def load_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping) -> None:
    """Put a :func:`checkpoint_state` loaded by ``torch.distributed.checkpoint`` back into the
    model and optimizer (the shards take the deltas at the next forward pass)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
