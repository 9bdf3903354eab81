"""``train --fsdp`` (FSDP2 over gloo, 2 processes on CPU) and ``--base-dtype``."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from _cli import assert_one_error, invoke

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fps_onnx.errors import DataError  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402
from fps_onnx.torch.train import fsdp, loop, precision  # noqa: E402
from fps_onnx.torch.train.recipe import CausalLMRecipe, Recipe, RecipeError  # noqa: E402
from llm_models import save_tiny_llm  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

LINES = ["The capital of France is Paris.", "The quick brown fox jumps over the lazy dog.",
         "Every layer has attention and a feed-forward block.", "A small model learns to predict."]
SELECTED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.embed_tokens.weight", "lm_head.weight")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(tmp: Path, kind: str = "llama", selected=SELECTED) -> tuple[Path, Path, Path]:
    """(model folder, mask file, train.txt): 10% of each of ``selected`` (by default four weights, the head
    among them); 4 samples (one global batch)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    save_tiny_llm(kind, tmp / "llm", seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "llm"), local_files_only=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    rng = np.random.default_rng(0)
    MaskFile({n: rng.random(tuple(params[n].shape)) < 0.1 for n in selected}, {}).save(tmp / "m.safetensors")
    (tmp / "train.txt").write_text("\n".join(LINES) + "\n")
    return tmp / "llm", tmp / "m.safetensors", tmp / "train.txt"


def _args(folder, masks, train, out, *extra) -> list[str]:
    return ["train", "--task", "causal-lm", "--model", f"hf:{folder}", "--masks", str(masks), "--train", str(train),
            "-o", str(out), "--epochs", "5", "--lr", "1e-2", "-q", *extra]


def _torchrun(*args) -> subprocess.CompletedProcess:
    script = shutil.which("fps-onnx", path=str(Path(sys.executable).parent))
    assert script is not None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _assert_same_deltas(one: Path, two: Path) -> float:
    from safetensors import safe_open
    from safetensors.torch import load_file

    a, b = load_file(str(one / "delta.safetensors")), load_file(str(two / "delta.safetensors"))
    assert sorted(a) == sorted(b)
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        if key.endswith(":indices"):
            assert torch.equal(a[key], b[key]), key
        else:
            worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    metas = []
    for folder in (one, two):
        with safe_open(str(folder / "delta.safetensors"), framework="pt") as handle:
            metas.append(handle.metadata())
    assert metas[0] == metas[1]
    return worst


@pytest.mark.parametrize("kind, extra, selected", [
    ("llama", (), SELECTED),
    ("llama", (), SELECTED[:2]),  # a frozen embedding and head, untied: never gathered whole
    pytest.param("llama", ("--chunked-loss",), SELECTED[:2], marks=pytest.mark.slow),  # the head's rows, chunked
    pytest.param("llama-tied", ("--train-head",), SELECTED, marks=pytest.mark.slow)])
def test_two_sharded_processes_train_the_deltas_one_process_does(tmp_path, kind, extra, selected):
    folder, masks, train = _case(tmp_path, kind, selected)
    result = invoke(*_args(folder, masks, train, tmp_path / "one", "--batch-size", "4", *extra))
    assert result.exit_code == 0, result.output
    done = _torchrun(*_args(folder, masks, train, tmp_path / "two", "--batch-size", "2", "--fsdp", *extra))
    assert done.returncode == 0, done.stderr[-3000:]

    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert _assert_same_deltas(tmp_path / "one", tmp_path / "two") <= 1e-5
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    base = load_file(str(folder / "model.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.float32}
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["recipe"]["fsdp"] is True
    assert len(metrics["rank_peak_memory_bytes"]) == 2


def test_two_sharded_processes_scale_the_steps_one_process_scales(tmp_path):
    """--step-scale under --fsdp: each process steps its share (ZeroRedundancyOptimizer), the new values
    are broadcast, then every process scales every entry's step alike: the deltas of one process."""
    from _models import channel_stats

    folder, masks, train = _case(tmp_path, "llama", SELECTED[:2])
    loaded = MaskFile.load(masks)
    MaskFile({k: loaded.dense(k) for k in loaded.keys()}, {}, {"model_sha256": "e" * 64}).save(masks)
    widths = {k: loaded.shape(k)[1] for k in loaded.keys()}
    channel_stats(widths, lambda j: (j + 1.0) ** 2).save(tmp_path / "s.safetensors")  # factors 1 .. ~0.25
    scaled = ("--step-scale", str(tmp_path / "s.safetensors"))
    for name, extra in (("one", scaled), ("plain", ())):
        result = invoke(*_args(folder, masks, train, tmp_path / name, "--batch-size", "4", *extra))
        assert result.exit_code == 0, result.output
    done = _torchrun(*_args(folder, masks, train, tmp_path / "two", "--batch-size", "2", "--fsdp", *scaled))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _assert_same_deltas(tmp_path / "one", tmp_path / "two") <= 1e-5
    assert _assert_same_deltas(tmp_path / "one", tmp_path / "plain") > 1e-3  # the factors changed the steps


def test_fsdp_without_a_launcher_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    folder, masks, train = _case(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = invoke(*_args(folder, masks, train, tmp_path / "out", "--fsdp"))
    assert_one_error(result, "torchrun --nproc_per_node N", absent=[tmp_path / "out"])


def test_fsdp_with_masks_matched_by_value_is_one_line(tmp_path, monkeypatch):
    folder, masks, train = _case(tmp_path)
    monkeypatch.setattr(fsdp, "check_world", lambda world, samples=None: None)  # as if under torchrun
    result = invoke(*_args(folder, masks, train, tmp_path / "out", "--fsdp", "--onnx", str(masks)))
    assert_one_error(result, "--fsdp needs masks keyed by parameter names", absent=[tmp_path / "out"])


def test_a_split_smaller_than_the_world_is_refused():
    fsdp.check_world(2, 2)
    with pytest.raises(RecipeError, match="several processes"):
        fsdp.check_world(1)
    with pytest.raises(DataError, match="holds 1 samples, fewer than the 2 processes"):
        fsdp.check_world(2, 1)


def test_blocks_are_the_decoder_layers_or_the_largest_list_of_same_class_modules(tmp_path):
    folder, _, _ = _case(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    assert fsdp.block_modules(model) == list(model.model.layers)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)]))
    assert fsdp.block_modules(net) == list(net[1])


def test_only_an_untied_frozen_embedding_and_head_are_used_from_their_row_shards(tmp_path):
    for kind, selected, expected in (("llama", SELECTED[:2], ["embed_tokens", "lm_head"]),
                                     ("llama", SELECTED[:3], ["lm_head"]), ("llama", SELECTED, []),
                                     ("llama-tied", SELECTED[:2], [])):
        folder, masks, _ = _case(tmp_path / f"{kind}-{len(selected)}", kind, selected)
        model = fsdp.meta_causal_lm(folder, torch.float32)
        loop.prepare(model, MaskFile.load(masks), CausalLMRecipe())
        names = {id(m): n.rpartition(".")[2] for n, m in model.named_modules()}
        assert [names[id(m)] for m in fsdp._row_sharded_units(model)] == expected, (kind, selected)


_ROW_SHARDED = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from fps_onnx.torch.train import fsdp
from fps_onnx.torch.train.run import _finish

dist.init_process_group("gloo")
rank = dist.get_rank()


def check():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fsdp.ROW_CHUNK_BYTES = 3 * 8 * 4  # 3 rows of 8 fp32 values a chunk: 37 rows make uneven shards and chunks
    # fp32: a few ulps of values near 10, as chunked sums of 37 products round in another order on another CPU
    # (seen: 3.8e-6 on an AMD EPYC); a wrong or missing chunk is off by O(1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        weight = torch.randn(37, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
        meta = torch.nn.Parameter(weight.to("meta"), requires_grad=False)
        head, embedding = fsdp.RowShardedHead(meta, mesh), fsdp.RowShardedEmbedding(meta, mesh)
        for module in (head, embedding):
            module.to_empty(device="cpu")
            first, rows = fsdp._rows(module.weight)
            module.weight.to_local().copy_(weight[first:first + rows])
        gen = torch.Generator().manual_seed(10 + rank)  # each process its own batch
        hidden = torch.randn(2, 5, 8, generator=gen).to(dtype).requires_grad_()
        logits = head(hidden)
        whole = hidden.detach() @ weight.T  # (a matmul of other widths may round in another order)
        assert logits.shape == whole.shape and torch.allclose(logits.float(), whole.float(), rtol=tol, atol=tol), "logits"
        upstream = torch.randn(2, 5, 37, generator=gen).to(dtype)
        logits.backward(upstream)
        expected = (upstream.float() @ weight.float()).to(dtype)
        assert torch.allclose(hidden.grad.float(), expected.float(), rtol=tol, atol=tol), "gradient"
        ids = torch.randint(0, 37, (3, 6), generator=gen)
        assert torch.equal(embedding(ids), weight[ids]), "embedding"
        try:
            embedding(torch.tensor([[37]]))
        except IndexError:
            pass
        else:
            return "an id past the vocabulary was taken"


failed = check()
_finish(dist.get_world_size())  # as `train` leaves the group: the modules and graphs above are freed first
sys.exit(failed)
"""


def test_a_row_sharded_head_and_embedding_give_the_whole_weights_results(tmp_path):
    script = tmp_path / "row_sharded.py"
    script.write_text(_ROW_SHARDED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_leaving_the_group_frees_cyclic_garbage_that_holds_its_tensors_first(monkeypatch):
    # freed only at interpreter exit, after the group is gone, such objects can make gloo abort the process
    import gc
    import weakref

    from fps_onnx.torch.train.run import _finish

    class Held:  # a sharded module or an autograd graph in a reference cycle
        pass

    held = Held()
    held.self = held
    alive = weakref.ref(held)
    del held
    calls = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append(("barrier", alive() is None)))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append(("destroy", alive() is None)))
    gc.disable()
    try:
        _finish(2)
    finally:
        gc.enable()
    assert calls == [("barrier", True), ("destroy", True)]


def test_every_weight_matrix_of_a_block_is_a_unit_of_its_own(tmp_path):
    folder, masks, _ = _case(tmp_path)
    model = fsdp.meta_causal_lm(folder, torch.float32)
    loop.prepare(model, MaskFile.load(masks), CausalLMRecipe())
    block = fsdp.block_modules(model)[0]
    units = fsdp._weight_modules(block)
    assert len(units) == 7 and all(isinstance(u, torch.nn.Linear) for u in units)
    assert block.self_attn.q_proj in units  # parametrised (a delta): the Linear, not its parametrisation


def test_meta_build_holds_no_weights_and_keeps_ties(tmp_path):
    folder, _, _ = _case(tmp_path, "llama-tied")
    model = fsdp.meta_causal_lm(folder, torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(b.device.type == "cpu" for b in model.buffers())  # rotary frequencies are computed


# ----------------------------------------------------------------------------- --base-dtype


def test_the_default_base_dtype_is_fp32_on_cpu_and_bf16_on_cuda():
    assert precision.base_dtype(Recipe(), "cpu") == torch.float32
    assert precision.base_dtype(Recipe(), "cuda:0") == torch.bfloat16
    assert precision.base_dtype(Recipe(base_dtype="fp16"), "cpu") == torch.float16
    with pytest.raises(RecipeError, match="--base-dtype must be one of bf16, fp16, fp32"):
        Recipe(base_dtype="fp8")


def test_a_half_base_keeps_deltas_and_their_optimizer_state_in_fp32(tmp_path):
    folder, masks, _ = _case(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              dtype=torch.bfloat16)
    recipe = CausalLMRecipe(base_dtype="bf16", train_norm=True)
    trainable = loop.prepare(model, str(masks), recipe)
    precision.cast_model(model, torch.bfloat16)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    optimizer = loop.make_optimizer(model, recipe)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with loop._autocast(torch.device("cpu"), recipe):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    states = [s for s in optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert all(d.values.abs().max() > 0 for d in trainable.deltas.values())


def test_a_half_base_is_read_tensor_by_tensor_into_what_from_pretrained_builds(tmp_path):
    folder, masks, _ = _case(tmp_path, "llama-tied")
    recipe = CausalLMRecipe(base_dtype="bf16")
    expected = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                                 dtype=torch.bfloat16)
    want = loop.prepare(expected, str(masks), recipe)
    model = fsdp.meta_causal_lm(folder, torch.bfloat16)
    got = loop.prepare(model, str(masks), recipe)
    precision.cast_model(model, torch.bfloat16)
    fsdp.load_weights(model, folder, torch.device("cpu"))
    originals = [m.parametrizations.weight.original for m in (model.lm_head, model.model.embed_tokens)]
    assert originals[0] is originals[1]  # still one tensor
    state, reference = model.state_dict(), expected.state_dict()
    assert sorted(state) == sorted(reference)
    for name, value in reference.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    assert sorted(got.deltas) == sorted(want.deltas)


def test_a_bf16_base_writes_its_merged_model_in_the_original_dtype(tmp_path):
    folder, masks, train = _case(tmp_path)
    result = invoke(*_args(folder, masks, train, tmp_path / "bf16", "--base-dtype", "bf16", "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    result = invoke(*_args(folder, masks, train, tmp_path / "fp32", "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    assert _files(tmp_path / "bf16") == _files(tmp_path / "fp32")
    base = load_file(str(folder / "model.safetensors"))
    merged = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    delta = load_file(str(tmp_path / "bf16" / "delta.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.float32}  # the base's own dtype, whatever --base-dtype
    assert {v.dtype for k, v in delta.items() if k.endswith(":values")} == {torch.float32}
    mask = MaskFile.load(masks).masks
    for name, before in base.items():  # entries outside the mask are the base's own, bit for bit
        outside = ~torch.from_numpy(np.asarray(mask[name])) if name in mask else torch.ones_like(before, dtype=bool)
        assert torch.equal(merged[name][outside], before[outside]), name
    losses = [json.loads((tmp_path / d / "metrics.json").read_text())["epochs"][-1]["train_loss"]
              for d in ("bf16", "fp32")]
    assert abs(losses[0] - losses[1]) < 0.05 * losses[1]


@pytest.mark.slow
def test_a_sharded_classifier_trains_what_ddp_trains(tmp_path):
    """The quickstart ViT (timm blocks, a new head and biases trained fully): --fsdp and DDP agree."""
    examples = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
    assert invoke("select", examples / "model.onnx", examples / "images", "-o", tmp_path / "m.safetensors",
                  "-q").exit_code == 0
    args = ["train", "--model", f"{examples / 'model.py'}:build", "--masks", str(tmp_path / "m.safetensors"),
            "--onnx", str(examples / "model.onnx"), "--train", str(examples / "images"), "--epochs", "2",
            "--batch-size", "8", "--lr", "1e-2", "-q"]
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        done = _torchrun(*args, "-o", str(tmp_path / name), *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    assert _files(tmp_path / "ddp") == _files(tmp_path / "fsdp") == [
        "delta.safetensors", "metrics.json", "model.safetensors"]
    assert _assert_same_deltas(tmp_path / "ddp", tmp_path / "fsdp") <= 1e-6


def _checkpoint_worker(rank: int, world: int, port: int, folder: str, masks: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    recipe = CausalLMRecipe(lr=1e-2)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(rank))

    def built():
        model = fsdp.meta_causal_lm(folder, torch.float32)
        loop.prepare(model, masks, recipe)
        fsdp.shard(model, torch.device("cpu"), folder=folder)
        return model, loop.make_optimizer(model, recipe)

    def step(model, optimizer):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer = built()
    step(model, optimizer)
    dcp.save(fsdp.checkpoint_state(model, optimizer), checkpoint_id=out + "/ckpt")
    resumed, fresh = built()
    state = fsdp.checkpoint_state(resumed, fresh)
    dcp.load(state, checkpoint_id=out + "/ckpt")
    fsdp.load_checkpoint_state(resumed, fresh, state)
    for m, o in ((model, optimizer), (resumed, fresh)):
        step(m, o)
    if rank == 0:
        torch.save({"a": fsdp.gather_trainable(model), "b": fsdp.gather_trainable(resumed)}, out + "/values.pt")
    torch.distributed.barrier()
    os._exit(0)


def test_a_checkpoint_of_the_trainable_state_resumes_the_same_training(tmp_path):
    folder, masks, _ = _case(tmp_path)
    torch.multiprocessing.spawn(_checkpoint_worker, args=(2, _free_port(), str(folder), str(masks), str(tmp_path)),
                                nprocs=2, join=True)
    got = torch.load(tmp_path / "values.pt", weights_only=True)
    assert sorted(got["a"]) == sorted(got["b"]) and any(k.endswith(".values") for k in got["a"])
    for name, value in got["a"].items():
        assert torch.equal(value, got["b"][name]), name
        assert value.abs().max() > 0, name


def _zero_worker(rank: int, world: int, port: int, folder: str, masks: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(rank))
    runs = {}
    for name, recipe in (("zero", CausalLMRecipe(lr=1e-2, fsdp=True)), ("plain", CausalLMRecipe(lr=1e-2))):
        model = fsdp.meta_causal_lm(folder, torch.float32)
        loop.prepare(model, masks, recipe)
        fsdp.shard(model, torch.device("cpu"), folder=folder)
        optimizer = loop.make_optimizer(model, recipe)
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            grads = sum(p.grad.numel() for p in params if p.grad is not None)
            loop.apply_gradients(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), recipe)
        held = optimizer.optim.state if name == "zero" else optimizer.state
        runs[name] = {"kind": type(optimizer).__name__, "values": fsdp.gather_trainable(model),
                      "held": sum(s["exp_avg"].numel() for s in held.values()), "grads": grads}
    torch.save(runs, f"{out}/zero{rank}.pt")
    torch.distributed.barrier()
    os._exit(0)


def test_a_sharded_run_keeps_each_adamw_state_and_gradient_on_one_process_and_trains_the_same_values(tmp_path):
    """ZeRO-2 for the replicated deltas: each process holds the AdamW state and the gradients of its
    share of them only (together: all of it, once); the values are those of plain AdamW (the
    clipping norm summed over the processes: its last bits) and equal on every process."""
    folder, masks, _ = _case(tmp_path)
    torch.multiprocessing.spawn(_zero_worker, args=(2, _free_port(), str(folder), str(masks), str(tmp_path)),
                                nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"zero{r}.pt", weights_only=True) for r in range(2)]
    total = sum(v.numel() for v in ranks[0]["plain"]["values"].values())
    assert ranks[0]["zero"]["kind"] == "ZeroRedundancyOptimizer" and ranks[0]["plain"]["kind"] == "AdamW"
    assert all(r["plain"]["held"] == total and r["plain"]["grads"] == total for r in ranks)
    held = [r["zero"]["held"] for r in ranks]
    assert sum(held) == total and 0 < min(held) and max(held) < total, (held, total)
    assert [r["zero"]["grads"] for r in ranks] == held  # a gradient only where its state is
    for r in ranks:
        for name, value in r["plain"]["values"].items():
            assert torch.equal(r["zero"]["values"][name], ranks[0]["zero"]["values"][name]), name
            assert torch.allclose(r["zero"]["values"][name], value, rtol=1e-5, atol=1e-7), name
            assert value.abs().max() > 0, name


def _chunked_worker(rank: int, world: int, port: int, folders: list[str], masks: str, out: str) -> None:
    from fps_onnx.errors import ExportError
    from fps_onnx.torch.train import causal

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    causal.LOSS_CHUNK_BYTES = 4 * 3 * 300  # 3 tokens a chunk of the 300-token vocabulary
    length = (9, 14)[rank]  # the processes hold unlike numbers of tokens, so of chunks
    ids = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(rank))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    runs = {}
    for chunked in (False, True):
        recipe = CausalLMRecipe(fsdp=True, chunked_loss=chunked, amp=False)
        model = fsdp.meta_causal_lm(folders[0], torch.float32)
        loop.prepare(model, masks, recipe)
        fsdp.shard(model, torch.device("cpu"), folder=folders[0])
        loss = causal.batch_loss_sum(model, batch, recipe)
        loss.backward()
        with torch.no_grad():
            evaluated = causal.batch_loss_sum(model, batch, recipe)
        runs[chunked] = {"loss": loss.item(), "eval": evaluated.item(), "head": type(model.lm_head).__name__,
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    tied = fsdp.meta_causal_lm(folders[1], torch.float32)
    recipe = CausalLMRecipe(fsdp=True, chunked_loss=True, amp=False)
    loop.prepare(tied, masks, recipe)
    fsdp.shard(tied, torch.device("cpu"), folder=folders[1])
    try:
        causal.batch_loss_sum(tied, batch, recipe)
        runs["tied"] = "trained"
    except ExportError as exc:
        runs["tied"] = str(exc)
    torch.save(runs, f"{out}/chunked{rank}.pt")
    torch.distributed.barrier()
    os._exit(0)


def test_a_chunked_loss_over_a_row_sharded_head_is_the_whole_logits_loss(tmp_path):
    """--chunked-loss --fsdp: the untied frozen head stays sharded by rows, each chunk's logits
    broadcast a chunk of rows at a time; the process with fewer tokens makes as many head calls
    (empty chunks) as the other, and the loss and the deltas' gradients are those of the whole
    logits. A head tied to the embedding is refused."""
    folder, masks, _ = _case(tmp_path, selected=SELECTED[:2])
    tied, _, _ = _case(tmp_path / "tied", "llama-tied", selected=SELECTED[:2])
    torch.multiprocessing.spawn(_chunked_worker, args=(2, _free_port(), [str(folder), str(tied)], str(masks),
                                                       str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        runs = torch.load(tmp_path / f"chunked{rank}.pt", weights_only=True)
        whole, chunks = runs[False], runs[True]
        assert chunks["head"] == "RowShardedHead"
        assert chunks["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        assert chunks["eval"] == pytest.approx(whole["eval"], rel=1e-6)
        assert sorted(chunks["grads"]) == sorted(whole["grads"]) and whole["grads"]
        for name, grad in whole["grads"].items():
            torch.testing.assert_close(chunks["grads"][name], grad, rtol=1e-5, atol=1e-6)
        assert "needs an untied, frozen output head" in runs["tied"] and "tied to its input embedding" in runs["tied"]


def test_a_shards_entries_are_the_span_of_sorted_indices_in_its_rows(monkeypatch):
    weight = torch.zeros(10, 7)
    indices = torch.from_numpy(np.flatnonzero(np.random.default_rng(0).random(70) < 0.3))
    seen = []
    for first, rows in ((0, 4), (4, 4), (8, 2), (10, 0)):  # FSDP's shards of 10 rows over 3 processes, and an empty one
        monkeypatch.setattr(fsdp, "_rows", lambda param, first=first, rows=rows: (first, rows))
        span, local = fsdp._local_entries(weight, indices)
        inside = (indices >= first * 7) & (indices < (first + rows) * 7)
        assert torch.equal(torch.arange(len(indices))[span], torch.nonzero(inside).flatten())
        assert local.dtype == torch.int32 and torch.equal(local.long(), indices[inside] - first * 7)
        seen += indices[span].tolist()
    assert seen == indices.tolist()  # every entry in exactly one shard
