"""The ``fps-onnx`` command line (installed as ``fps_onnx.cli``)."""
