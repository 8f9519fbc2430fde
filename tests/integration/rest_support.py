"""Helpers for the REST binding's tests: JSON bodies, and the offline reference answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway.dtypes import NUMPY_BY_DATATYPE
from tests.onnx_models import IDENTITY_DTYPES, write_identity_model, write_mixed_dtype_model
from tests.support import MODELS

# The bundled models' one input each: name and the shape of one row.
INPUTS = {"digits": ("pixels", (64,)), "mlp": ("input", (784,)), "convnet": ("image", (1, 28, 28))}


def datatype_repo(root: Path) -> Path:
    """A repository of the unseen-model tests' models: `mixed` (several input types) and an
    identity model per datatype (`identity_<dtype>`)."""
    write_mixed_dtype_model(root / "mixed" / "1" / "model.onnx")
    (root / "mixed" / "model.toml").write_text("max_batch_size = 8\n")
    for dtype in IDENTITY_DTYPES:
        write_identity_model(root / f"identity_{dtype.lower()}" / "1" / "model.onnx", dtype)
        (root / f"identity_{dtype.lower()}" / "model.toml").write_text("max_batch_size = 4\n")
    return root


def offline(model: str, version: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The bundled model run by onnxruntime directly, by output name."""
    session = ort.InferenceSession(str(MODELS / model / version / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def tensor(name: str, array: np.ndarray, datatype: str = "FP32", nested: bool = False) -> dict[str, Any]:
    """One input of a JSON infer request, its data flat (row-major) or nested as its shape."""
    data = array.tolist() if nested else array.ravel().tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def infer_body(*inputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **fields}


def output(document: dict[str, Any], name: str) -> np.ndarray:
    """An output of a JSON infer response as an array of its datatype and shape."""
    entry = next(o for o in document["outputs"] if o["name"] == name)
    return np.array(entry["data"], dtype=NUMPY_BY_DATATYPE[entry["datatype"]]).reshape(entry["shape"])
