"""``hf``: the one place transformers reads a model folder (``hf:DIR``).

Every transformers ``AutoConfig``, ``AutoModel*`` and ``AutoTokenizer`` load of
fps-onnx goes through :func:`load_config`, :func:`load_model` or
:func:`load_tokenizer`. Each passes ``trust_remote_code=False`` and
``local_files_only=True`` and first calls :func:`check_folder`, which refuses
(ModelError), before transformers reads or imports anything from it, a folder
that would make transformers run, or ask to run, code of its own:

* ``auto_map`` in ``config.json`` or another config transformers reads
  (:data:`CODE_CONFIGS`: ``tokenizer_config.json``, the processor configs);
* a ``model_type`` transformers does not know, or none;
* any ``*.py`` file in the folder.

Files copied out of a folder (config and tokenizer files beside an export, or
into a merged model folder) are :func:`side_files`: each must be a regular file
that really lies (symlinks followed) inside the folder, or inside the folder its
``config.json`` really lies in (a Hugging Face cache snapshot links its files
to blobs there); it is read through a descriptor opened without following a
last link or blocking (:func:`fps_onnx.onnx.external.open_inside`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import fnmatch
import math
import os
from pathlib import Path
import shutil

from .._limits import MAX_JSON_CHARS, read_json, whole_number
from ..errors import ModelError
from ..onnx.external import model_roots, open_inside

__all__ = ["CODE_CONFIGS", "CONFIG_FILE", "DTYPE_BYTES", "LOAD_KWARGS", "StoredTensor", "check_folder", "copy_side_file",
    "load_config", "load_model", "load_tokenizer", "meta_model", "model_from_config", "side_files", "weight_files",
    "weight_headers", "weight_shapes"]

CONFIG_FILE = "config.json"
#: Configs transformers reads an ``auto_map`` (code in the folder) from.
CODE_CONFIGS = (CONFIG_FILE, "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                "image_processor_config.json", "feature_extractor_config.json", "video_preprocessor_config.json")
#: What every transformers load is given: nothing downloaded, no code from the folder.
LOAD_KWARGS = {"trust_remote_code": False, "local_files_only": True}


def check_folder(folder: str | os.PathLike, known_type: bool = True) -> dict:
    """The parsed ``config.json`` of a transformers folder that holds no code to run.

    ModelError when the folder has no ``config.json``, a config that is not a
    JSON object, ``auto_map`` in any of :data:`CODE_CONFIGS`, a ``model_type``
    transformers does not know, or a ``*.py`` file. Nothing from the folder is
    imported; transformers itself is only asked for its list of model types
    (not with ``known_type=False``: that import loads torch).
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelError(f"hf:{folder} is not a transformers model folder: it has no {CONFIG_FILE}")
    roots = _roots(folder)
    with os.scandir(folder) as entries:
        code = sorted(entry.name for entry in entries if entry.name.endswith(".py"))
    if code:
        raise ModelError(f"hf:{folder} holds Python code ({', '.join(map(repr, code[:3]))}); "
                         "fps-onnx never runs code from a model folder: remove it")
    config = None
    for name in CODE_CONFIGS:
        if not os.path.lexists(folder / name):
            continue
        value = _read_config(folder / name, roots)
        if name == CONFIG_FILE:
            config = value
        if "auto_map" in value:
            raise ModelError(f"hf:{folder}: {name} has auto_map, which names code in the folder to run; "
                             "fps-onnx never runs code from a model folder")
    if not known_type:
        return config
    model_type = config.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        shown = "no model_type" if model_type is None else f"model_type {str(model_type)[:60]!r}"
        raise ModelError(f"hf:{folder}: {CONFIG_FILE} has {shown}, which this transformers does not know; "
                         "fps-onnx loads only model types built into transformers")
    return config


def load_config(folder: str | os.PathLike):
    """``AutoConfig`` of a checked folder (:func:`check_folder`)."""
    check_folder(folder)
    _offline()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), **LOAD_KWARGS)


def load_model(auto_class: str, folder: str | os.PathLike, **kwargs):
    """``transformers.<auto_class>.from_pretrained`` of a checked folder (:func:`check_folder`)."""
    check_folder(folder)
    _offline()
    import transformers

    return getattr(transformers, auto_class).from_pretrained(str(folder), **LOAD_KWARGS, **kwargs)


def model_from_config(auto_class: str, folder: str | os.PathLike, config_fields: dict | None = None, **kwargs):
    """``transformers.<auto_class>.from_config`` of a checked folder's config: the
    architecture, no weights read (and no code of the folder run). ``config_fields``
    (e.g. ``num_labels``) are set on the config first; ``kwargs`` go to ``from_config``."""
    config = load_config(folder)
    for name, value in (config_fields or {}).items():
        setattr(config, name, value)
    import transformers

    return getattr(transformers, auto_class).from_config(config, trust_remote_code=False, **kwargs)


def meta_model(auto_class: str, folder: str | os.PathLike, **config_fields):
    """:func:`model_from_config` on PyTorch's meta device: the parameters' names and
    shapes, no weights read or allocated."""
    import torch

    with torch.device("meta"):
        return model_from_config(auto_class, folder, config_fields)


def load_tokenizer(folder: str | os.PathLike):
    """``AutoTokenizer`` of a checked folder (:func:`check_folder`)."""
    check_folder(folder)
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **LOAD_KWARGS)


def side_files(folder: str | os.PathLike, patterns: Iterable[str]) -> list[Path]:
    """The entries of ``folder`` matching ``patterns`` (names or globs), sorted by name,
    each checked to be a regular file inside the folder (see the module docstring).

    Subfolders are left out; ModelError names the first other entry that is not
    such a file (a link out of the folder, a FIFO, a broken link): its content is
    never read.
    """
    folder = Path(folder)
    roots = _roots(folder)
    patterns = tuple(patterns)
    with os.scandir(folder) as entries:
        found = sorted(folder / entry.name for entry in entries
                       if any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)
                       and not entry.is_dir(follow_symlinks=False))
    for path in found:
        with open_inside(path, roots, "a side file of the model"):
            pass
    return found


def copy_side_file(source: Path, target: str | os.PathLike) -> None:
    """Copy the side file ``source`` (of :func:`side_files`) to ``target``, checking it again as it is opened."""
    with open_inside(source, _roots(source.parent), "a side file of the model") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


#: The weights of a folder that :func:`weight_shapes` reads the headers of: one file, or the
#: shards an index names.
WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
#: At most this many shards an index may name (a 1T-parameter model has a few hundred).
MAX_SHARDS = 4096


def weight_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of the folder's safetensors weights (:func:`weight_headers`)."""
    headers = weight_headers(folder)
    return None if headers is None else {k: stored.shape for k, stored in headers.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where a safetensors header puts one tensor: its file, dtype (``"F32"``, ``"BF16"``, ...),
    shape, and the bytes ``[start, stop)`` of the file that hold it (checked to lie in the
    data and to be as many as the shape and a known dtype make)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


#: Bytes per element of the safetensors dtypes (others are stored without a size check).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def weight_headers(folder: str | os.PathLike) -> dict[str, StoredTensor] | None:
    """Tensor name -> :class:`StoredTensor` of the folder's safetensors weights, from the
    files' headers alone (nothing else of them read; neither torch nor transformers
    imported): ``model.safetensors``, or the shards ``model.safetensors.index.json`` names.
    None when the folder has neither.

    Each file is opened as a side file is (a regular file really inside the folder, see the
    module docstring); ModelError for an index that is not a ``weight_map`` of plain
    ``.safetensors`` file names, a header longer than the file or than
    :data:`~fps_onnx._limits.MAX_JSON_CHARS`, one that is not JSON of tensors with a
    ``dtype``, whole-number dims and data offsets inside the file (as many bytes as the
    shape and dtype make), or a tensor named in two shards."""
    folder = Path(folder)
    roots = _roots(folder)
    files = weight_files(folder)
    if files is None:
        return None
    headers: dict[str, StoredTensor] = {}
    for path in files:
        for key, stored in _header_entries(path, roots).items():
            if key in headers:
                raise ModelError(f"hf:{folder}: tensor {key!r} is in two weight files")
            headers[key] = stored
    return headers


def weight_files(folder: str | os.PathLike) -> list[Path] | None:
    """The folder's safetensors weight files: ``model.safetensors``, or the shards
    ``model.safetensors.index.json`` names (sorted); None when it has neither. ModelError
    for an index that is not a ``weight_map`` of at most :data:`MAX_SHARDS` plain
    ``.safetensors`` file names."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if os.path.lexists(index):
        with open_inside(index, _roots(folder), "the weights index of the model") as fh:
            data = fh.read(MAX_JSON_CHARS + 1)
        value = read_json(data, str(index), ModelError)
        weight_map = value.get("weight_map") if isinstance(value, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index} has no weight_map object")
        files = sorted(set(weight_map.values()), key=str)
        if len(files) > MAX_SHARDS or not all(
                isinstance(f, str) and f.endswith(".safetensors") and f == os.path.basename(f)
                and "\0" not in f for f in files):
            raise ModelError(f"{index}: its weight_map must name at most {MAX_SHARDS} .safetensors files "
                             "of the folder by their plain names")
        return [folder / f for f in files]
    if os.path.lexists(folder / WEIGHTS_FILE):
        return [folder / WEIGHTS_FILE]
    return None


def _header_entries(path: Path, roots: tuple[str, ...]) -> dict[str, StoredTensor]:
    """Tensor name -> :class:`StoredTensor`, as the header of the safetensors file ``path`` gives them."""
    with open_inside(path, roots, "a weight file of the model") as fh:
        size = os.fstat(fh.fileno()).st_size
        length = int.from_bytes(fh.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_JSON_CHARS):
            raise ModelError(f"{path} is not a safetensors file (its header length {length:,} does not "
                             f"fit the file of {size:,} bytes or {MAX_JSON_CHARS:,} characters)")
        header = read_json(fh.read(length), f"the header of {path}", ModelError)
    if not isinstance(header, dict):
        raise ModelError(f"the header of {path} is not a JSON object")
    entries = {}
    data = 8 + length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dims = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not isinstance(dims, list) or not isinstance(entry.get("dtype"), str):
            raise ModelError(f"the header of {path}: tensor {key!r} has no dtype and shape")
        shape = tuple(whole_number(d, f"the header of {path}: a dim of {key!r}", ModelError) for d in dims)
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise ModelError(f"the header of {path}: tensor {key!r} has no data_offsets [start, end]")
        start, stop = (whole_number(o, f"the header of {path}: an offset of {key!r}", ModelError)
                       for o in offsets)
        item = DTYPE_BYTES.get(entry["dtype"])
        if not start <= stop <= size - data or (item is not None and stop - start != math.prod(shape) * item):
            raise ModelError(f"the header of {path}: tensor {key!r} {entry['dtype']} {list(shape)} does not "
                             f"fit its data_offsets {offsets} (the data holds {size - data:,} bytes)")
        entries[key] = StoredTensor(path, entry["dtype"], shape, data + start, data + stop)
    return entries


def _offline() -> None:
    """No download, whatever transformers is asked (set before it first imports huggingface_hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _roots(folder: Path) -> tuple[str, ...]:
    return model_roots(str(folder), folder / CONFIG_FILE)


def _read_config(path: Path, roots: tuple[str, ...]) -> dict:
    with open_inside(path, roots, "a config file of the model") as fh:
        data = fh.read(MAX_JSON_CHARS + 1)
    value = read_json(data, str(path), ModelError)
    if not isinstance(value, dict):
        raise ModelError(f"{path} is not a JSON object")
    return value
