"""A model input as the data readers and the decoder feeder see it (:class:`InputSpec`), and the
ONNX Runtime input types that can be fed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError

__all__ = ["InputSpec"]

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (ints for static dims, None/str otherwise), dtype."""

    name: str
    shape: tuple
    dtype: np.dtype

    @classmethod
    def from_ort(cls, arg) -> InputSpec:
        """From an ``onnxruntime.NodeArg``."""
        dtype = _ONNX_DTYPES.get(arg.type)
        if dtype is None:
            raise DataError(f"model input {arg.name!r} has type {arg.type}, which cannot be fed")
        return cls(arg.name, tuple(arg.shape), np.dtype(dtype))

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} [{dims}] {self.dtype.name}"
