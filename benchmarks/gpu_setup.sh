#!/usr/bin/env bash
# On the GPU machine: reassemble onnxruntime-gpu (cp312, CUDA 13) from the parts
# copied one call at a time into $PARTS (default /tmp/ortparts/), unpack it into
# $SITE (default /tmp/site) and check that ONNX Runtime gets the CUDA provider.
#
# The archive is the wheel's onnxruntime/ package and dist-info, without the
# TensorRT provider and the C-API library libonnxruntime.so (the Python binding
# does not load it), tar + xz. CUDA, cuBLAS, cuFFT, cuRAND, NVRTC and cuDNN come
# from the nvidia-* pip packages that torch (cu130) already installed: a link
# $SITE/nvidia -> site-packages/nvidia lets onnxruntime.preload_dlls() find them.
#
# Then: export PYTHONPATH=$SITE:.   (from the repository root)
set -euo pipefail
PARTS=${PARTS:-/tmp/ortparts}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
EXPECTED_PARTS=${EXPECTED_PARTS:-4}
EXPECTED_SHA256=${EXPECTED_SHA256:-42b75ad92f6ad3e1d33ae7d0a1f52d978743e59d49fb01838ab2289766b992de}

have=$(ls "$PARTS"/part-* 2>/dev/null | wc -l)
if [ "$have" != "$EXPECTED_PARTS" ]; then
    echo "found $have of $EXPECTED_PARTS parts in $PARTS:" >&2
    ls -l "$PARTS" >&2 || true
    exit 1
fi
archive=$(mktemp /tmp/ort-gpu.XXXXXX.tar.xz)
cat "$PARTS"/part-* > "$archive"
got=$(sha256sum "$archive" | cut -d' ' -f1)
if [ "$got" != "$EXPECTED_SHA256" ]; then
    echo "archive checksum $got, expected $EXPECTED_SHA256 (a part is missing or damaged)" >&2
    exit 1
fi
rm -rf "$SITE"
mkdir -p "$SITE"
# Python's tarfile reads xz everywhere, with or without an xz binary.
"$PY" - "$archive" "$SITE" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as tar:
    tar.extractall(sys.argv[2], filter="data")
EOF
rm -f "$archive"

nvidia=$("$PY" - <<'EOF'
import importlib.util
spec = importlib.util.find_spec("nvidia")
paths = list(spec.submodule_search_locations) if spec else []
print(next((p for p in paths if __import__("os").path.isdir(p + "/cu13")), paths[0] if paths else ""))
EOF
)
if [ -n "$nvidia" ]; then
    ln -sfn "$nvidia" "$SITE/nvidia"
    echo "linked $SITE/nvidia -> $nvidia"
else
    echo "no nvidia pip packages found: CUDA libraries must come from the system or from torch" >&2
fi

if [ -n "${SKIP_CHECK:-}" ]; then
    echo "unpacked into $SITE (CUDA check skipped)"
    exit 0
fi
PYTHONPATH="$SITE" "$PY" - <<'EOF'
import onnxruntime as ort
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("providers", ort.get_available_providers())
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
from onnx import TensorProto, helper
g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("a CUDA session runs on", s.get_providers()[0])
EOF
echo "ready: export PYTHONPATH=$SITE:.  (from the repository root), then"
echo "       python benchmarks/gpu_select_memory.py"
