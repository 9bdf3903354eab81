"""``train`` end to end: model, masks, data, (distributed) training and the output folder.

Classification (:func:`run_train`): the output folder receives
``model.safetensors`` (merged dense weights, PyTorch names),
``delta.safetensors`` (see :func:`fps_onnx.torch.train.delta.save_delta`) and ``metrics.json``.
Causal language modelling (:func:`run_train_causal`): ``delta.safetensors``
(naming the base model's hash), ``model/`` (a folder
``AutoModelForCausalLM.from_pretrained`` loads) and ``metrics.json``.
Either way they are written together (one folder renamed into place, other
files already in the folder kept) and only once training has finished, by the
first process when several run under ``torchrun``. Until then nothing is
created, not even the folder (checkpoints, with ``checkpointing``, go to a
folder of their own: :mod:`.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
import gc
import json
import logging
import os
from pathlib import Path

from ..._io import atomic_folder, atomic_write, check_folder, write_safetensors
from ...errors import MaskError, OutputError
from ...selection.maskfile import MaskFile
from ..models import build_for_data, rekey_masks
from . import causal, delta, fsdp, hf_folder, lm_data, loop, precision, sparse
from ._torch import nn, torch
from .checkpoint import Checkpointing, Checkpoints, ResumableSampler, identity, model_digest
from .data import ImageSpec, LabelledSet, open_split
from .delta import save_delta
from .recipe import CausalLMRecipe, Recipe, RecipeError

__all__ = ["Splits", "image_spec", "run_train", "run_train_causal", "write_causal_outputs", "write_outputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    """Paths of the data splits (validation and test are optional)."""

    train: str | os.PathLike
    val: str | os.PathLike | None = None
    test: str | os.PathLike | None = None


def image_spec(model: nn.Module, example, image_size: int | None) -> ImageSpec | None:
    """How images must look for ``model``; None when its example input is not an image batch."""
    if isinstance(example, dict) and len(example) == 1:
        (example,) = example.values()
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        if image_size is None:
            return None
        channels, size = 3, image_size
    else:
        channels, size = int(example.shape[1]), image_size or int(example.shape[-1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    return ImageSpec(size, channels, **({"mean": tuple(mean), "std": tuple(std)} if mean and std else {}))


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _loader(dataset: LabelledSet, recipe: Recipe, *, train: bool, rank: int, world: int):
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

    generator = torch.Generator().manual_seed(recipe.seed)
    if train:  # a checkpoint's epoch goes on mid-way (shuffle=True's sampler, resumable)
        sampler = (DistributedSampler(dataset, world, rank, shuffle=True, seed=recipe.seed) if world > 1
                   else RandomSampler(dataset, generator=generator))
        return DataLoader(dataset, recipe.batch_size, sampler=ResumableSampler(sampler),
                          generator=generator, num_workers=recipe.workers)
    if world > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world))  # every sample once
    return DataLoader(dataset, recipe.batch_size, shuffle=False, generator=generator,
                      num_workers=recipe.workers)


_MMAP_THRESHOLD = 128 * 1024


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold so freed activation buffers go back to the OS.

    glibc raises the threshold as large blocks are freed, after which freed
    activations stay in the heap and peak RSS follows the allocator rather than
    live memory (measured: ViT-B/16 training peak 5.81 -> 4.67 GiB on CPU).
    Same effect as ``MALLOC_MMAP_THRESHOLD_=131072``; a no-op off glibc.
    """
    import ctypes
    import ctypes.util

    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _output_folder(output: str | os.PathLike) -> Path:
    """``output`` as a Path, or OutputError when it is a file (memory handling set up first)."""
    _return_freed_memory()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write to {out}: it is a file, not a folder")
    return out


def _device(device: str | None, local_rank: int) -> torch.device:
    """``device``, else this process's GPU when there is one, else the CPU."""
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _place(model: nn.Module, device: torch.device, world: int, **ddp) -> nn.Module:
    """Move ``model`` to ``device``; the module to train: ``model``, or its DDP wrapper
    (``ddp``: its keyword arguments) when ``world`` > 1, the masks' buffers not synced."""
    model.to(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, sparse.buffer_names(model))
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp)


def _trainable_summary(model: nn.Module, trainable: loop.Trainable) -> dict:
    """The metrics' ``trainable`` entry: selected entries, sparse tensors and dense parameters."""
    params = dict(model.named_parameters())
    return {"selected": trainable.selected, "sparse_tensors": len(trainable.deltas),
            "dense": sum(params[n].numel() for n in trainable.dense),
            "dense_tensors": trainable.dense}


def _checkpoints(config: Checkpointing | None, out: Path, rank: int, world: int,
                 device: torch.device, task: str, model_sha256: str, model: nn.Module, recipe: Recipe,
                 splits: Splits, **more) -> Checkpoints | None:
    """The run's :class:`.Checkpoints` (the one to resume read and checked now), or None."""
    if config is None:
        return None
    ident = identity(task, model_sha256, model, {"train": splits.train, "val": splits.val},
                                recipe, world, **more)
    return Checkpoints(config, ident, out, rank=rank, world=world, device=device)


def _check_step_scale(path, onnx_model) -> None:
    """What ``--step-scale`` needs of the run, checked before anything is built."""
    if path is None:
        return
    if onnx_model is not None:
        raise RecipeError("--step-scale needs masks keyed by parameter names, not --onnx: "
                          "map them first with `fps-onnx map`")


def _scale_steps(model: nn.Module, maskfile: MaskFile, path) -> dict:
    """With ``path`` (``--step-scale``: the selection's statistics; :func:`_check_step_scale` passed),
    give the attached deltas their entries' step factors (:func:`loop.attach_step_scales`);
    returns what a checkpoint's identity adds."""
    if path is None:
        return {}
    count, digest = loop.attach_step_scales(model, maskfile, path)
    log.info("steps scaled per input channel on %d weights (%s)", count, path)
    return {"step_scale_sha256": digest}


def _rank_peaks(device: torch.device, world: int) -> dict:
    """``{"rank_peak_memory_bytes": [...]}``: each process's peak memory after training
    (:func:`loop.peak_memory`), when several run; else nothing."""
    if world <= 1:
        return {}
    peak = torch.tensor([loop.peak_memory(device)[0]], dtype=torch.int64, device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    torch.distributed.all_gather(peaks, peak)
    return {"rank_peak_memory_bytes": [int(p.item()) for p in peaks]}


def _finish(world: int) -> None:
    """Wait for every process, then leave the process group (several processes only).

    Garbage is collected first: objects in reference cycles that still hold the group's tensors
    (sharded modules, autograd graphs) are otherwise freed at interpreter exit, after the group is
    gone, where gloo can abort the process (SIGABRT) once its outputs are written."""
    if world > 1:
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_train(
    spec: str,
    masks: str | os.PathLike | MaskFile,
    splits: Splits,
    output: str | os.PathLike,
    recipe: Recipe = Recipe(),
    *,
    checkpoint: str | os.PathLike | None = None,
    onnx_model: str | os.PathLike | None = None,
    step_scale: str | os.PathLike | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    device: str | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpointing: Checkpointing | None = None,
) -> dict:
    """Fine-tune the entries ``masks`` selects of the model ``spec``; returns the metrics.

    ``onnx_model``: the ONNX file the masks were selected on, when their keys are
    ONNX initializer names (matched to the model's parameters by value).
    ``step_scale``: the selection's statistics, to scale each entry's steps by its input
    channel (:mod:`fps_onnx.selection.stepscale`).
    ``checkpointing``: save checkpoints, or go on from one (:mod:`.checkpoint`).
    """
    _check_step_scale(step_scale, onnx_model)
    out = _output_folder(output)
    for given, option in ((recipe.max_steps is not None, "--max-steps"), (recipe.accumulate != 1, "--accumulate"),
                          (recipe.checkpointing, "--checkpointing")):
        if given:
            raise RecipeError(f"{option} applies to --task causal-lm only")
    rank, world, local_rank = _distributed()
    if recipe.fsdp:
        fsdp.check_world(world)
    if rank == 0:
        check_folder(out)  # created only with the outputs, at the end
    maskfile = masks if isinstance(masks, MaskFile) else MaskFile.load(masks)
    train_set = open_split(splits.train)
    if recipe.fsdp:
        fsdp.check_world(world, len(train_set))
    val_set = open_split(splits.val, train_set.classes) if splits.val else None
    test_set = open_split(splits.test, train_set.classes) if splits.test else None
    classes = num_classes or train_set.num_classes()
    for split in (train_set, val_set, test_set):
        if split is not None:
            split.check_labels(classes)

    def build():
        torch.manual_seed(recipe.seed)
        return build_for_data(spec, checkpoint, classes, num_classes is not None, image_size, recipe.seed)

    model, example = build()
    loop.check_head(model, classes)
    digest = model_digest(model) if checkpointing is not None else ""
    image = image_spec(model, example, image_size)
    for split in (train_set, val_set, test_set):
        if split is not None:
            split.set_image(image)
            if isinstance(example, dict):
                split.set_inputs(list(example))
    device = _device(device, local_rank)
    dtype = precision.base_dtype(recipe, device)
    trainable = loop.prepare(model, maskfile, recipe, onnx_model=onnx_model)
    scaled = _scale_steps(model, maskfile, step_scale)
    checkpoints = _checkpoints(checkpointing, out, rank, world, device, "classification", digest, model, recipe,
                               splits, num_classes=classes, image_size=image_size, **scaled)
    del maskfile  # the deltas hold its indices now
    precision.cast_model(model, dtype)
    net = fsdp.shard(model, device) if recipe.fsdp else _place(model, device, world)

    history = loop.fit(
        net, _loader(train_set, recipe, train=True, rank=rank, world=world),
        _loader(val_set, recipe, train=False, rank=rank, world=world) if val_set else None,
        recipe=recipe, device=device,
        on_step=on_step if rank == 0 else None, on_epoch=on_epoch if rank == 0 else None,
        checkpoints=checkpoints,
    )
    if test_set is not None:
        history["test_accuracy"] = loop.evaluate(
            net, _loader(test_set, recipe, train=False, rank=rank, world=world), device, recipe)
    metrics = {
        **history,
        "model": spec,
        "num_classes": classes,
        "trainable": _trainable_summary(model, trainable),
        "world_size": world,
        "device": str(device),
        "recipe": asdict(recipe),
        **_rank_peaks(device, world),
    }
    if recipe.fsdp or dtype != torch.float32:
        state, masks = fsdp.gather_trainable(model), fsdp.delta_indices(model)
        if recipe.fsdp:
            fsdp.release(model)
        del net, model, trainable
        model, trainable = _plain(state, masks, lambda: build()[0], recipe, rank)
    if rank == 0:
        write_outputs(model, trainable, metrics, out)
    _finish(world)
    return metrics


def _plain(state: dict, masks: dict, build: Callable[[], nn.Module], recipe: Recipe,
           rank: int) -> tuple[nn.Module | None, loop.Trainable | None]:
    """The trained model as a plain one in the base's own dtype, to write the outputs from.

    A sharded or half-precision model is not one: the caller gathers its
    trainable tensors (``state``, :func:`fsdp.gather_trainable`) and its
    deltas' indices (``masks``, :func:`fsdp.delta_indices`) and drops it, then
    rank 0 builds the model again, prepares it with the same entries and takes
    the tensors (other ranks get ``(None, None)``).
    """
    gc.collect()  # the sharded model's hooks hold it in a reference cycle
    if rank != 0:
        return None, None
    plain = build()
    params = dict(plain.named_parameters())
    # the deltas' own indices, not dense masks: a dense bool array of every selected weight at once
    # would be a byte per weight of the model
    selected = MaskFile.from_indices({name: (tuple(params[name].shape), indices.numpy())
                                      for name, indices in masks.items()})
    trainable = loop.prepare(plain, selected, recipe)
    fsdp.load_trainable(plain, state)
    return plain, trainable


def write_outputs(model: nn.Module, trainable: loop.Trainable, metrics: dict, out: Path) -> None:
    """delta.safetensors, model.safetensors and metrics.json, appearing in ``out`` together.

    They are written into a temporary folder that then takes the place of
    ``out`` (:func:`atomic_folder`; missing parent folders are created first);
    on failure ``out`` is as it was.
    """
    out = check_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for name, tensor in sparse.merged_state_dict(model).items():
        tensor = tensor.detach().cpu()
        ptr = tensor.untyped_storage().data_ptr()
        state[name] = tensor.clone() if ptr in seen else tensor.contiguous()  # tied weights
        seen.add(ptr)
    text = json.dumps(metrics, indent=2, default=str)
    with atomic_folder(out) as tmp:
        save_delta(model, tmp / "delta.safetensors", dense=trainable.dense)
        write_safetensors(tmp / "model.safetensors", state, {"format": "pt"}, framework="pt")
        atomic_write(tmp / "metrics.json", lambda f: Path(f).write_text(text))
    log.info("wrote %s, %s and %s", out / "model.safetensors", out / "delta.safetensors",
             out / "metrics.json")


def _check_causal_masks(model: nn.Module, maskfile: MaskFile) -> MaskFile:
    """The masks keyed by parameter names of this causal LM, or one MaskError line."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    masks = rekey_masks(maskfile, names)
    if not len(masks):
        raise MaskError("the mask file holds no masks")
    unknown = [k for k in masks.keys() if k not in set(names)]
    if unknown:
        raise MaskError(f"mask key {unknown[0]!r} is not a parameter of {type(model).__name__} "
                        f"({len(unknown)} of {len(masks)} keys are not): masks of another model? "
                        "Map ONNX names with `fps-onnx map` or --onnx MODEL.onnx")
    return masks


def run_train_causal(
    spec: str,
    masks: str | os.PathLike | MaskFile,
    splits: Splits,
    output: str | os.PathLike,
    recipe: Recipe = CausalLMRecipe(),
    *,
    onnx_model: str | os.PathLike | None = None,
    step_scale: str | os.PathLike | None = None,
    device: str | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpointing: Checkpointing | None = None,
) -> dict:
    """Fine-tune the entries ``masks`` selects of the causal LM ``hf:DIR``; returns the metrics.

    Data: see :mod:`.lm_data`; loss, accumulation and perplexity: :mod:`.causal`.
    Writes ``delta.safetensors``, ``model/`` and ``metrics.json`` into ``output``
    (see the module docstring). ``onnx_model``: the ONNX file the masks were
    selected on, when their keys are ONNX initializer names. ``step_scale``: as
    for :func:`run_train`.
    """
    _check_step_scale(step_scale, onnx_model)
    out = _output_folder(output)
    folder = hf_folder.causal_lm_folder(spec)
    rank, world, local_rank = _distributed()
    if recipe.fsdp:
        fsdp.check_world(world)
        if onnx_model is not None:  # matching by value needs the weights, which a sharded build reads later
            raise RecipeError("--fsdp needs masks keyed by parameter names, not --onnx: "
                              "map them first with `fps-onnx map`")
    if rank == 0:
        check_folder(out)
    maskfile = masks if isinstance(masks, MaskFile) else MaskFile.load(masks)
    base_hash = hf_folder.base_sha256(folder)
    device = _device(device, local_rank)
    dtype = precision.base_dtype(recipe, device)

    torch.manual_seed(recipe.seed)
    meta = recipe.fsdp or dtype != torch.float32  # built without weights; read once prepared, in dtype
    model = fsdp.meta_causal_lm(folder, dtype) if meta else hf_folder.build_causal_lm(spec, recipe.seed, dtype=dtype)
    if onnx_model is None:
        maskfile = _check_causal_masks(model, maskfile)
    tokenizer = lm_data.load_tokenizer(folder)
    max_length = lm_data.model_max_length(model, recipe.max_length)
    vocab = model.get_input_embeddings().weight.shape[0]
    sets = {name: lm_data.open_lm_split(path, tokenizer, max_length, vocab) if path else None
            for name, path in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    log.info("%d training samples, %s tokens to predict, max length %d", len(sets["train"]),
             f"{sets['train'].predicted_tokens():,}", max_length)
    if recipe.fsdp:
        fsdp.check_world(world, len(sets["train"]))

    trainable = loop.prepare(model, maskfile, recipe, onnx_model=onnx_model)
    scaled = _scale_steps(model, maskfile, step_scale)
    del maskfile  # the deltas hold its indices now
    precision.cast_model(model, dtype)
    tied = sparse.tied_names(model)
    for name in trainable.dense:
        if name in tied:
            log.warning("%s are one tied tensor, trained fully", " and ".join(tied[name]))
    if recipe.checkpointing:
        causal.enable_checkpointing(model)
    checkpoints = _checkpoints(checkpointing, out, rank, world, device, "causal-lm", base_hash, model, recipe,
                               splits, max_length=max_length, **scaled)
    if meta and not recipe.fsdp:
        fsdp.load_weights(model, folder, device)
    net = (fsdp.shard(model, device, folder=folder) if recipe.fsdp
           else _place(model, device, world, broadcast_buffers=False))

    collate = lm_data.Collate(lm_data.pad_id(tokenizer))

    def loader(dataset, train: bool):
        if dataset is None:
            return None
        from torch.utils.data import DataLoader

        plain = _loader(dataset, recipe, train=train, rank=rank, world=world)
        return DataLoader(plain.dataset, recipe.batch_size, sampler=plain.sampler, collate_fn=collate,
                          num_workers=recipe.workers)

    history = causal.fit(
        net, loader(sets["train"], True), loader(sets["val"], False), recipe=recipe, device=device,
        on_step=on_step if rank == 0 else None, on_epoch=on_epoch if rank == 0 else None,
        checkpoints=checkpoints,
    )
    if sets["test"] is not None:
        test = causal.evaluate(net, loader(sets["test"], False), device, recipe)
        history["test_loss"], history["test_perplexity"] = test["loss"], test["perplexity"]
    metrics = {
        **history,
        "task": "causal-lm",
        "model": spec,
        "base_sha256": base_hash,
        "max_length": max_length,
        "trainable": _trainable_summary(model, trainable),
        "world_size": world,
        "device": str(device),
        "recipe": asdict(recipe),
        **_rank_peaks(device, world),
    }
    done = delta.trained(model, trainable.dense)
    plain = not (recipe.fsdp or dtype != torch.float32)  # the model as trained is the base plus deltas
    if recipe.fsdp:
        fsdp.release(model)  # rank 0 writes the outputs from the base's files and the deltas alone
    if not plain:
        del net, model, trainable
    if rank == 0:
        merged = (lambda: sparse.merge(model)) if plain else (lambda: hf_folder.merged_model(spec, done))
        write_causal_outputs(done, metrics, out, folder, base_hash, merged)
    _finish(world)
    return metrics


def write_causal_outputs(trained: delta.Trained, metrics: dict, out: Path, base: Path, base_hash: str,
                         merged: Callable[[], nn.Module]) -> None:
    """delta.safetensors, model/ and metrics.json, appearing in ``out`` together.

    ``model/`` is written from the base folder's files and ``trained``, a tensor at a time
    (:func:`hf_folder.write_merged_folder`); where the base cannot be streamed, from the plain
    merged model ``merged()`` returns (``save_pretrained``).
    """
    out = check_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2, default=str)
    with atomic_folder(out) as tmp:
        delta.write_delta(trained, tmp / "delta.safetensors",
                          metadata={hf_folder.BASE_HASH_KEY: base_hash, "task": "causal-lm"})
        if not hf_folder.write_merged_folder(trained, base, tmp / "model"):
            hf_folder.save_model_folder(merged().eval().cpu(), base, tmp / "model")
        atomic_write(tmp / "metrics.json", lambda f: Path(f).write_text(text))
    log.info("wrote %s, %s and %s", out / "delta.safetensors", out / "model", out / "metrics.json")
