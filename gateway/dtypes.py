"""Datatype names of the Open Inference Protocol, numpy dtypes and ONNX types.

BYTES and BF16 are not served: numpy has no bfloat16, and BYTES tensors need a
string runtime path that no bundled model uses. A model using them is refused
at load with a message that says so.
"""

from __future__ import annotations

from typing import Final

import numpy as np

# KServe datatype -> numpy dtype (little-endian, as the raw wire format is).
NUMPY_BY_DATATYPE: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

DATATYPE_BY_NUMPY: Final[dict[np.dtype[np.generic], str]] = {v: k for k, v in NUMPY_BY_DATATYPE.items()}

# onnxruntime's NodeArg.type strings -> KServe datatype.
DATATYPE_BY_ONNX: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

# Which InferTensorContents field carries each datatype in typed form.
# FP16 has none: it travels only as raw bytes.
CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
