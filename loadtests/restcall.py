"""The bench's request over REST (KServe v2 JSON, or Triton's binary tensor extension), and the check of its answer.

Built once per bench from the same inputs as the gRPC request (signature.feeds),
so gRPC, REST JSON and REST binary carry the same tensors. JSON mode sends
`{"inputs": [{"name", "shape", "datatype", "data": [...]}]}` and takes JSON
back; binary mode sends a JSON header followed by each input's raw bytes
(`Inference-Header-Content-Length` says where the JSON ends) and asks for
every output as raw bytes too (`binary_data_output`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from gateway.dtypes import NUMPY_BY_DATATYPE
from gateway.protocol.pb import inference_pb2 as pb
from gateway.types import TensorSpec
from loadtests.httpclient import HttpAnswer
from loadtests.signature import ModelSignature, check_response, feeds

RestMode = Literal["json", "binary"]


@dataclass(frozen=True, slots=True)
class RestCall:
    """One infer request as HTTP: the path, the body and the headers that describe it."""

    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


def infer_path(model: str, version: str) -> str:
    return f"/v2/models/{model}/versions/{version}/infer" if version else f"/v2/models/{model}/infer"


def build_rest_call(signature: ModelSignature, rows: int, mode: RestMode, pin_version: bool, seed: int = 0) -> RestCall:
    """The request for `rows` rows (pinned to the signature's version, or routed), in `mode`."""
    values = feeds(signature, rows, seed)
    path = infer_path(signature.name, signature.version if pin_version else "")
    inputs: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for spec in signature.inputs:
        array = np.ascontiguousarray(values[spec.name])
        tensor: dict[str, Any] = {"name": spec.name, "shape": list(array.shape), "datatype": spec.datatype}
        if mode == "binary":
            raw.append(array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            # orjson writes a float32 array in float32's shortest form, as a fast JSON client would.
            tensor["data"] = array.ravel()
        inputs.append(tensor)
    document: dict[str, Any] = {"inputs": inputs}
    if mode == "binary":
        document["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if mode == "json":
        return RestCall(path, header, (("Content-Type", "application/json"),))
    headers = (("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", str(len(header))))
    return RestCall(path, b"".join([header, *raw]), headers)


def as_response(answer: HttpAnswer) -> pb.ModelInferResponse:
    """A REST answer as the ModelInferResponse it stands for, each output's data as raw bytes.

    Raises ValueError (or orjson's JSONDecodeError, a ValueError) when it does not parse.
    """
    body, json_length = answer.body, answer.json_length
    document = orjson.loads(body if json_length is None else body[:json_length])
    binary = memoryview(body)[json_length or len(body) :]
    response = pb.ModelInferResponse(model_name=document["model_name"], model_version=document["model_version"])
    offset = 0
    for output in document["outputs"]:
        response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            if offset + size > len(binary):
                raise ValueError(f"output {output['name']!r}: {size} bytes, {len(binary) - offset} left")
            response.raw_output_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        elif "data" in output:
            dtype = NUMPY_BY_DATATYPE.get(output["datatype"])
            data = output["data"]
            # BYTES (strings) have no fixed size to check; their UTF-8 stands in for the raw bytes.
            encoded = "".join(data).encode() if dtype is None else np.asarray(data, dtype=dtype).tobytes()
            response.raw_output_contents.append(encoded)
        else:
            raise ValueError(f"output {output['name']!r} has neither data nor binary_data_size")
    if offset != len(binary):
        raise ValueError(f"{len(binary) - offset} bytes of binary data that no output accounts for")
    return response


def check_rest_answer(answer: HttpAnswer, outputs: Sequence[TensorSpec], rows: int) -> str | None:
    """What is wrong with a REST answer to `rows` rows: the gRPC check (signature.check_response) on its data."""
    try:
        response = as_response(answer)
    except (ValueError, KeyError, TypeError) as exc:
        return f"response does not parse: {exc!r}"
    return check_response(response, outputs, rows)
