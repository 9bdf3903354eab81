"""Peak GPU memory and time of selection on one GPU: GPS-style gradients against FPS.

ViT-B/16 (timm, random init, 224 px), N random images, one batch size. Each
variant runs in its own process, so CUDA contexts and allocators never mix:

* gps-bf16 / gps-fp32: GPS-style selection in PyTorch: train mode, forward +
  backward of a cross-entropy on random labels per batch (bf16 autocast with
  fp32 weights and gradients, or plain fp32), gradients summed over the set (no
  zero_grad), then the top-k |grad| of every row of every Linear/Conv weight;
* fps-ort: ``fps_onnx.pipeline.run_select`` with the CUDA execution provider
  (what ``fps-onnx select --provider cuda`` runs), fp32;
* fps-torch: FPS the PyTorch way, for reference: forward pre-hooks summing
  |x| per input channel of every Linear/Conv, no grad, fp32, then the top-k of
  |w| * mean|a| per row.

k per row comes from the same budget for every variant (fps_onnx.select.SelectConfig).
GPU memory is read two ways: ``torch.cuda.max_memory_allocated`` inside the
PyTorch variants (blind to ONNX Runtime), and NVML device memory polled every
~5 ms by this parent process (which never creates a CUDA context) while the
child runs; "idle" is the reading just before the child starts, and both the
raw peak and peak minus idle are reported (the latter includes the child's
CUDA context). Wall time is given for the whole process and for the selection
itself (timed inside the child, after model build and CUDA start-up).

Run from the repository root::

    PYTHONPATH=/tmp/site:. python benchmarks/gpu_select_memory.py [--images 256] [--batch-size 32]
    PYTHONPATH=. python benchmarks/gpu_select_memory.py --dry-run   # tiny model, CPU, 8 images

Results go to $OUT/gpu_select_memory.{md,json} when OUT is set, else to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
import platform
import sys
import threading
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import child_command, output_tail, run_measured, write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
SEED = 0
GIB = 1024**3
RESULT_TAG = "RESULT "  # a child's last stdout line: RESULT {json}
CUDA_PROVIDER = "CUDAExecutionProvider"


# --------------------------------------------------------------------------- children
# Heavy imports stay inside these functions: each runs in its own process.


def _result(**values) -> None:
    print(RESULT_TAG + json.dumps(values), flush=True)


def build_model(tiny: bool):
    """The seeded, randomly initialised ViT every variant uses."""
    import timm
    import torch

    torch.manual_seed(SEED)
    if tiny:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                 embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return timm.create_model("vit_base_patch16_224", pretrained=False)


def _paths(tiny: bool, images: int) -> tuple[Path, Path]:
    name = "vit_tiny_test" if tiny else "vit_base_patch16_224"
    return WORK / f"{name}.onnx", WORK / f"{name}-images-{images}.npy"


def role_info() -> None:
    """Versions, the GPU, and whether ORT really gets the CUDA provider."""
    from importlib.metadata import version

    info = {"python": platform.python_version(), "torch": version("torch")}
    import torch

    info["torch_cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    info["onnxruntime_file"] = ort.__file__
    info["ort_providers"] = ort.get_available_providers()
    info["preload_dlls"] = _preload_dlls()
    from fps_onnx import providers

    info["ort_cuda_unavailable"] = providers.cuda_unavailable()
    for key, value in info.items():
        print(f"{key}: {value}", flush=True)
    _result(**info)


def _preload_dlls() -> str:
    """Make ORT's CUDA provider find CUDA/cuDNN; returns what was done.

    First ``onnxruntime.preload_dlls()`` (recent ORT: loads them from the pip
    nvidia packages beside onnxruntime); if the CUDA provider still cannot be
    used, importing torch loads the same libraries (torch links them), and ORT
    finds them by soname. Neither creates a CUDA context.
    """
    import onnxruntime as ort

    from fps_onnx import providers

    done = []
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
            done.append("preload_dlls")
        except Exception as exc:  # noqa: BLE001 - best effort, the CUDA check says the rest
            done.append(f"preload_dlls failed ({exc})")
    else:
        done.append("no preload_dlls in this onnxruntime")
    if CUDA_PROVIDER in ort.get_available_providers() and providers.cuda_unavailable() is not None:
        try:
            import torch  # noqa: F401 - loads libcudart/cublas/cudnn into the process
        except ImportError:
            return ", ".join(done)
        providers.cuda_unavailable.cache_clear()
        done.append("import torch")
    return ", ".join(done)


def role_prepare(tiny: bool, images: int) -> None:
    """Export the model to ONNX and write the images, once (cached)."""
    import numpy as np

    WORK.mkdir(parents=True, exist_ok=True)
    onnx_path, data_path = _paths(tiny, images)
    if not onnx_path.exists():
        import torch

        model = build_model(tiny).eval()
        size = 32 if tiny else 224
        tmp = onnx_path.with_suffix(".tmp.onnx")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(tmp), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        tmp.replace(onnx_path)
    if not data_path.exists():
        size = 32 if tiny else 224
        data = np.random.default_rng(SEED).standard_normal((images, 3, size, size), dtype=np.float32)
        tmp = data_path.with_suffix(".tmp.npy")
        np.save(tmp, data)
        tmp.replace(data_path)
    _result(model=str(onnx_path), data=str(data_path))


def _device_stats(torch, device: str) -> dict:
    if device != "cuda":
        return {}
    return {
        "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def _row_top_k(torch, score, k: int):
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, score.topk(k, dim=1).indices, True)


def role_gps(tiny: bool, images: int, batch_size: int, device: str, precision: str) -> None:
    """GPS-style: summed gradients over the set, then the top-k |grad| per row."""
    import numpy as np
    import torch

    from fps_onnx.selection.score import SelectConfig

    _, data_path = _paths(tiny, images)
    model = build_model(tiny).to(device).train()
    array = np.load(data_path, mmap_mode="r")
    classes = model.num_classes
    labels = torch.randint(0, classes, (len(array),), generator=torch.Generator().manual_seed(SEED))
    loss_fn = torch.nn.CrossEntropyLoss()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    config = SelectConfig()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    for first in range(0, len(array), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(array[first : first + batch_size])).to(device)
        with autocast:
            loss = loss_fn(model(x), labels[first : first + batch_size].to(device))
        loss.backward()  # gradients accumulate over the set, as in GPS
    selected = 0
    with torch.no_grad():
        for layer in layers:
            grad = layer.weight.grad.abs().reshape(layer.weight.shape[0], -1)
            selected += int(_row_top_k(torch, grad, config.keep(*grad.shape)).sum())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _result(select_s=seconds, selected=selected, tensors=len(layers), **_device_stats(torch, device))


def role_fps_torch(tiny: bool, images: int, batch_size: int, device: str) -> None:
    """FPS with forward pre-hooks: sum |x| per input channel, no grad, then |w| * mean|a|."""
    import numpy as np
    import torch

    from fps_onnx.selection.score import SelectConfig

    _, data_path = _paths(tiny, images)
    model = build_model(tiny).to(device).eval()
    array = np.load(data_path, mmap_mode="r")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    sums = {}

    def pre_hook(module, args):
        x = args[0].detach()
        if isinstance(module, torch.nn.Conv2d):
            total = x.abs().sum(dim=(0, 2, 3), dtype=torch.float32)
            rows = x.numel() // x.shape[1]
        else:
            total = x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float32)
            rows = x.numel() // x.shape[-1]
        acc = sums.get(module)
        sums[module] = (total, rows) if acc is None else (acc[0] + total, acc[1] + rows)

    handles = [m.register_forward_pre_hook(pre_hook) for m in layers]
    config = SelectConfig()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(array), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(array[first : first + batch_size])).to(device))
        selected = 0
        for layer in layers:
            total, rows = sums[layer]
            w = layer.weight.abs()
            act = (total / rows).reshape(1, -1, *([1] * (w.dim() - 2)))
            score = (w * act).reshape(w.shape[0], -1)
            selected += int(_row_top_k(torch, score, config.keep(*score.shape)).sum())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for h in handles:
        h.remove()
    _result(select_s=seconds, selected=selected, tensors=len(layers), **_device_stats(torch, device))


def role_fps_ort(tiny: bool, images: int, batch_size: int, provider: str) -> None:
    """``run_select`` with the given ORT provider, as ``fps-onnx select`` runs it."""
    preload = _preload_dlls() if provider == "cuda" else "not needed"
    from fps_onnx.calibrate import CalibrationConfig
    from fps_onnx.data import DataConfig
    from fps_onnx.pipeline import run_select

    model_path, data_path = _paths(tiny, images)
    start = time.perf_counter()
    result = run_select(model_path, data_path, calibration=CalibrationConfig(provider=provider),
                        data_config=DataConfig(batch_size=batch_size))
    seconds = time.perf_counter() - start
    result.masks.save(WORK / "gpu_bench_masks.safetensors")
    _result(select_s=seconds, calibration_loop_s=result.seconds, provider=result.provider,
            selected=result.masks.selected, tensors=len(result.masks.masks), preload_dlls=preload)


# --------------------------------------------------------------------------- parent


class NvmlPoller:
    """Device memory in use, polled in a thread (NVML creates no CUDA context)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.available = False
        self.reason = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.available = True
        except Exception as exc:  # noqa: BLE001 - no NVML, no driver, no GPU
            self.reason = f"NVML not available ({exc})"

    def used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def process_total(self) -> int | None:
        """Sum of per-process GPU memory NVML reports (None where it reports none)."""
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # noqa: BLE001
            return None
        values = [p.usedGpuMemory for p in procs if p.usedGpuMemory is not None]
        return sum(values) if values else None

    def name(self) -> str | None:
        if not self.available:
            return None
        name = self._nvml.nvmlDeviceGetName(self._handle)
        return name.decode() if isinstance(name, bytes) else name

    def measure(self, fn):
        """Run ``fn()`` while polling; returns (fn's value, readings in GiB)."""
        if not self.available:
            return fn(), {}
        idle = self.used()
        peak = [idle, 0, 0]  # device used, per-process total, samples
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], self.used())
                per_proc = self.process_total()
                if per_proc is not None:
                    peak[1] = max(peak[1], per_proc)
                peak[2] += 1
                time.sleep(self.interval_s)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            value = fn()
        finally:
            stop.set()
            thread.join()
        return value, {
            "nvml_idle_gib": idle / GIB,
            "nvml_peak_gib": peak[0] / GIB,
            "nvml_peak_minus_idle_gib": (peak[0] - idle) / GIB,
            "nvml_process_peak_gib": peak[1] / GIB if peak[1] else None,
            "nvml_samples": peak[2],
        }


def _child(role: str, *args) -> list[str]:
    return child_command(__file__, role, *args)


def _parse(result: dict) -> dict | None:
    for line in reversed(result["stdout"].splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def _run_child(name: str, cmd: list[str], poller: NvmlPoller, timeout_s: float) -> dict:
    measured, nvml = poller.measure(lambda: run_measured(cmd, timeout_s=timeout_s))
    parsed = _parse(measured)
    row = {"variant": name, "returncode": measured["returncode"], "wall_s": measured["wall_s"],
           "peak_rss_gib": measured["peak_rss_gib"], **nvml, **(parsed or {})}
    if measured["returncode"] != 0 or parsed is None:
        row["error"] = output_tail(measured, 8) or f"exit {measured['returncode']}"
        print(f"{name} FAILED (exit {measured['returncode']}):\n{row['error']}", flush=True)
    else:
        print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "variant"),
              flush=True)
    return row


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _memory(row: dict) -> float | None:
    """The figure compared across variants: NVML peak minus idle, else torch's, else RSS."""
    for key in ("nvml_peak_minus_idle_gib", "torch_max_allocated_gib", "peak_rss_gib"):
        if row.get(key) is not None:
            return row[key]
    return None


def _markdown(report: dict) -> str:
    info = report["info"]
    lines = [
        "# Selection memory and time on one GPU: GPS-style gradients against FPS",
        "",
        f"- date: {report['date']}",
        f"- device: {report['device_name']}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
        f"onnxruntime {info.get('onnxruntime')}, providers {info.get('ort_providers')}",
        f"- ORT CUDA provider: {'usable' if info.get('ort_cuda_unavailable') is None else info.get('ort_cuda_unavailable')}",
        f"- command: `{report['command']}`",
        f"- {report['images']} images, batch {report['batch_size']}, {report['model']}, random init",
        f"- memory compared: {report['memory_measure']}",
        "",
        "| variant | GPU peak - idle (GiB) | GPU peak raw (GiB) | torch max allocated (GiB) | "
        "selection time (s) | process wall (s) | host peak RSS (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row, key, fmt="{:.2f}"):
        value = row.get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        lines.append(
            f"| {row['variant']} | {cell(row, 'nvml_peak_minus_idle_gib')} | {cell(row, 'nvml_peak_gib')} | "
            f"{cell(row, 'torch_max_allocated_gib')} | {cell(row, 'select_s', '{:.1f}')} | "
            f"{cell(row, 'wall_s', '{:.1f}')} | {cell(row, 'peak_rss_gib')} |"
        )
    if report["ratios"]:
        lines += ["", "| ratio | memory | selection time | process wall |", "|---|---:|---:|---:|"]
        for name, r in report["ratios"].items():
            lines.append(f"| {name} | {r['memory']:.2f} | {r['select_s']:.2f} | {r['wall_s']:.2f} |")
    lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="cpu exercises every code path without a GPU [default: cuda; cpu with --dry-run]")
    parser.add_argument("--gps-precision", choices=("bf16", "fp32", "both"), default="both")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny ViT, 8 images, batch 4 (on the CPU unless --device cuda): checks the code paths only")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per child process")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return _dispatch(args.role, args.rest)
    if args.dry_run:
        args.images, args.batch_size = 8, 4
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    tiny = int(args.dry_run)
    started = time.perf_counter()

    poller = NvmlPoller() if args.device == "cuda" else NvmlPoller.__new__(NvmlPoller)
    if args.device != "cuda":
        poller.available, poller.reason = False, "CPU run"
    notes = []
    if not poller.available:
        notes.append(f"GPU memory not polled: {poller.reason}")

    info = _parse(run_measured(_child("info"), timeout_s=args.timeout)) or {}
    ort_cuda = info.get("ort_cuda_unavailable", "info child failed") is None
    provider = "cuda" if args.device == "cuda" else "cpu"
    prepared = run_measured(_child("prepare", tiny, args.images), timeout_s=max(args.timeout, 300))
    if _parse(prepared) is None:
        raise SystemExit("preparing the model and data failed:\n" + prepared["stderr"][-3000:])

    precisions = ("bf16", "fp32") if args.gps_precision == "both" else (args.gps_precision,)
    variants = {f"gps-{p}": _child("gps", tiny, args.images, args.batch_size, args.device, p)
                for p in precisions}
    if args.device == "cuda" and not ort_cuda:
        notes.append(f"fps-ort was NOT run: the ORT CUDA provider is unusable here "
                     f"({info.get('ort_cuda_unavailable')})")
    else:
        variants["fps-ort"] = _child("fps-ort", tiny, args.images, args.batch_size, provider)
    variants["fps-torch"] = _child("fps-torch", tiny, args.images, args.batch_size, args.device)

    rows = [_run_child(name, cmd, poller, args.timeout) for name, cmd in variants.items()]
    ok = {r["variant"]: r for r in rows if "error" not in r}
    ratios = {}
    for gps in (n for n in ok if n.startswith("gps-")):
        for fps in ("fps-ort", "fps-torch"):
            if fps in ok and _memory(ok[fps]):
                ratios[f"{gps} / {fps}"] = {
                    "memory": _memory(ok[gps]) / _memory(ok[fps]),
                    "select_s": ok[gps]["select_s"] / ok[fps]["select_s"],
                    "wall_s": ok[gps]["wall_s"] / ok[fps]["wall_s"],
                }
    memory_measure = ("NVML device memory, peak minus idle (includes each process's CUDA context)"
                      if poller.available else "host peak RSS (no GPU polled)")
    notes += [
        "gps-bf16: torch.autocast bf16, fp32 weights and gradients; gps-fp32 and fps-torch: fp32; "
        "fps-ort: fp32 ONNX model, ORT default CUDA provider options (arena growth included)",
        "selection time: inside the child, from the first batch to the masks (fps-ort: the whole "
        "run_select call, which includes building the ORT session); process wall adds imports, model "
        "build and CUDA start-up",
        f"whole benchmark took {time.perf_counter() - started:.0f} s",
    ]
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device_name": poller.name() if poller.available else f"{args.device}: {info.get('gpu')}",
        "model": "tiny ViT (dry run)" if tiny else "vit_base_patch16_224",
        "images": args.images, "batch_size": args.batch_size, "info": info,
        "memory_measure": memory_measure, "rows": rows, "ratios": ratios, "notes": notes,
    }
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    write_report(out, "gpu_select_memory_dry_run" if tiny else "gpu_select_memory", _markdown(report), report)


def _dispatch(role: str, rest: list[str]) -> None:
    if role == "info":
        return role_info()
    tiny, images = bool(int(rest[0])), int(rest[1])
    if role == "prepare":
        return role_prepare(tiny, images)
    batch = int(rest[2])
    if role == "gps":
        return role_gps(tiny, images, batch, rest[3], rest[4])
    if role == "fps-torch":
        return role_fps_torch(tiny, images, batch, rest[3])
    if role == "fps-ort":
        return role_fps_ort(tiny, images, batch, rest[3])
    raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
