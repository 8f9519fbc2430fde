"""Writers for test-only ONNX models (no test cases live here).

Integration tests use these to build model repositories that the project
does not ship.  Each writer produces only the ``.onnx`` file; the test writes
its own ``model.toml``.  Only numpy and onnx are needed, so the helpers work
in environments without onnxruntime or scikit-learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Same opset / IR pairing as models/build.py, for the same portability reason.
OPSET: Final = 17
IR_VERSION: Final = 8
BATCH: Final = "batch"

# KServe v2 datatype name -> ONNX element type, for the numeric types
# onnxruntime can pass through Identity.
KSERVE_TO_ONNX: Final[dict[str, int]] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}
IDENTITY_DTYPES: Final[tuple[str, ...]] = tuple(KSERVE_TO_ONNX)


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tests/onnx_models.py",
    )
    model.ir_version = IR_VERSION
    # Catch wiring mistakes when the test builds its repository, not later
    # as an opaque load failure inside the gateway.
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _value(name: str, elem_type: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def write_mixed_dtype_model(path: Path) -> None:
    """ids INT64 [batch,4], weights FP16 [batch,4] ->
    sum FP32 [batch] = sum_j float(ids)*float(weights), ids_twice INT64 = ids*2.
    """
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["weights"], ["weights_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "weights_f"], ["products"]),
        helper.make_node("ReduceSum", ["products", "axis1"], ["sum"], keepdims=0),
        helper.make_node("Mul", ["ids", "two"], ["ids_twice"]),
    ]
    inits = [
        # Opset 13+ takes ReduceSum axes as an input tensor, not an attribute.
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(2, dtype=np.int64), "two"),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed_dtype",
        [
            _value("ids", TensorProto.INT64, [BATCH, 4]),
            _value("weights", TensorProto.FLOAT16, [BATCH, 4]),
        ],
        [
            _value("sum", TensorProto.FLOAT, [BATCH]),
            _value("ids_twice", TensorProto.INT64, [BATCH, 4]),
        ],
        initializer=inits,
    )
    _save(graph, path)


def _spin_body(size: int) -> onnx.GraphProto:
    """Loop body: acc <- acc @ spin_matrix (spin_matrix is an outer-scope value)."""
    nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("MatMul", ["acc_in", "spin_matrix"], ["acc_out"]),
    ]
    return helper.make_graph(
        nodes,
        "spin_body",
        [
            _value("iteration", TensorProto.INT64, []),
            _value("cond_in", TensorProto.BOOL, []),
            _value("acc_in", TensorProto.FLOAT, [size, size]),
        ],
        [
            _value("cond_out", TensorProto.BOOL, []),
            _value("acc_out", TensorProto.FLOAT, [size, size]),
        ],
    )


def write_spin_model(
    path: Path, size: int = 64, trip_scale: int = 1, trip_offset: int = 0, fault: str | None = None
) -> None:
    """x FP32 [batch,4], spin INT64 [batch,1] -> y FP32 [batch,4] == x.

    The graph runs max(spin) * trip_scale + trip_offset iterations of a
    (size x size) MatMul before producing y, so a test controls compute time
    through the ``spin`` input (spin=0 runs the loop zero times by default).

    ``fault`` makes a misbehaving version with the same inputs, for shadow
    tests: "raise" fails at run time once any x > 0.5 (an out-of-range Gather index), "garbage"
    answers y with the wrong shape [batch, 5], "hang" runs ~3 s more once any x > 0.5.
    """
    # A cyclic permutation matrix: the MatMul does full work each iteration,
    # but the carried values are only reordered, so they never overflow to
    # inf/NaN (which would turn the "+ 0 * sum" below into NaN).
    permutation = np.roll(np.eye(size, dtype=np.float32), 1, axis=1)
    start = np.linspace(-1.0, 1.0, size * size, dtype=np.float32).reshape(size, size)
    nodes = [
        # No axes attribute: reduce over everything to a scalar trip count.
        helper.make_node("ReduceMax", ["spin"], ["max_spin"], keepdims=0),
        helper.make_node("Mul", ["max_spin", "trip_scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "trip_offset"], ["base_trip"]),
        # big = 1 once any x > 0.5: the faults below trigger on it, so the
        # gateway's warm-up (zeros) runs clean and fast.
        helper.make_node("ReduceMax", ["x"], ["x_max"], keepdims=0),
        helper.make_node("Greater", ["x_max", "half"], ["is_big"]),
        helper.make_node("Cast", ["is_big"], ["big"], to=TensorProto.INT64),
        helper.make_node("Mul", ["big", "hang_trips"], ["extra_trip"]),
        helper.make_node("Add", ["base_trip", "extra_trip"], ["trip"]),
        # An empty cond input makes Loop a plain for-loop over `trip`.
        helper.make_node("Loop", ["trip", "", "spin_start"], ["spun"], body=_spin_body(size)),
        # y = x + 0 * sum(spun): the value is x, but y data-depends on the
        # loop, so no optimizer may drop it and the caller waits for it.
        helper.make_node("ReduceSum", ["spun"], ["spun_sum"], keepdims=0),
        helper.make_node("Mul", ["spun_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["x", "nothing"], ["y" if fault in (None, "hang") else "x_out"]),
    ]
    y_shape: list[int | str] = [BATCH, 4]
    fault_inits = []
    if fault == "raise":
        # Index 10 (out of range) once any x > 0.5.
        nodes += [
            helper.make_node("Mul", ["big", "ten"], ["shift"]),
            helper.make_node("Add", ["base_index", "shift"], ["bad_index"]),
            helper.make_node("Gather", ["x_out", "bad_index"], ["y"], axis=1),
        ]
        fault_inits += [
            numpy_helper.from_array(np.array(10, dtype=np.int64), "ten"),
            numpy_helper.from_array(np.array([0, 1, 2, 3], dtype=np.int64), "base_index"),
        ]
    elif fault == "garbage":
        nodes.append(helper.make_node("Concat", ["x_out", "x_out"], ["wide"], axis=1))
        nodes.append(helper.make_node("Slice", ["wide", "slice_start", "slice_end", "slice_axis"], ["y"]))
        fault_inits += [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "slice_start"),
            numpy_helper.from_array(np.array([5], dtype=np.int64), "slice_end"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "slice_axis"),
        ]
        y_shape = [BATCH, 5]
    elif fault not in (None, "hang"):
        raise ValueError(f"unknown fault {fault!r}")
    inits = [
        *fault_inits,
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        # "hang": about 3 s of extra loop once any x > 0.5.
        numpy_helper.from_array(np.array(1_200_000 if fault == "hang" else 0, dtype=np.int64), "hang_trips"),
        numpy_helper.from_array(np.array(trip_scale, dtype=np.int64), "trip_scale"),
        numpy_helper.from_array(np.array(trip_offset, dtype=np.int64), "trip_offset"),
        numpy_helper.from_array(permutation, "spin_matrix"),
        numpy_helper.from_array(start, "spin_start"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "spin",
        [
            _value("x", TensorProto.FLOAT, [BATCH, 4]),
            _value("spin", TensorProto.INT64, [BATCH, 1]),
        ],
        [_value("y", TensorProto.FLOAT, y_shape)],
        initializer=inits,
    )
    _save(graph, path)


def write_identity_model(path: Path, dtype_name: str) -> None:
    """x [batch,3] of KServe type ``dtype_name`` -> y = Identity(x)."""
    try:
        elem_type = KSERVE_TO_ONNX[dtype_name]
    except KeyError:
        known = ", ".join(IDENTITY_DTYPES)
        raise ValueError(f"unsupported datatype {dtype_name!r}; use one of {known}") from None
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{dtype_name.lower()}",
        [_value("x", elem_type, [BATCH, 3])],
        [_value("y", elem_type, [BATCH, 3])],
    )
    _save(graph, path)


def write_slowed_copy(source: Path, target: Path, iterations: int, output: str = "probabilities") -> None:
    """A copy of `source` that answers the same but runs `iterations` extra 64x64 MatMuls first.

    For load-test gate tests: the same model, only slower ("v2 with padding work").
    """
    model = onnx.load(str(source))
    graph = model.graph
    size = 64
    raw = f"{output}_before_padding"
    producer = next(i for i, node in enumerate(graph.node) if output in node.output)
    graph.node[producer].output[list(graph.node[producer].output).index(output)] = raw
    padding = [
        helper.make_node("Loop", ["pad_trips", "", "pad_start"], ["pad_spun"], body=_spin_body(size)),
        helper.make_node("ReduceSum", ["pad_spun"], ["pad_sum"], keepdims=0),
        helper.make_node("Mul", ["pad_sum", "pad_zero"], ["pad_nothing"]),
        helper.make_node("Add", [raw, "pad_nothing"], [output]),
    ]
    for offset, node in enumerate(padding, start=1):
        graph.node.insert(producer + offset, node)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), "pad_trips"),
            numpy_helper.from_array(np.linspace(-1, 1, size * size, dtype=np.float32).reshape(size, size), "pad_start"),
            numpy_helper.from_array(np.roll(np.eye(size, dtype=np.float32), 1, axis=1), "spin_matrix"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "pad_zero"),
        ]
    )
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def write_sequence_model(path: Path, first: int | str = BATCH) -> None:
    """input_ids INT64 [first,seq], attention_mask INT64 [first,seq] ->
    masked INT64 [first,seq] = input_ids * attention_mask, scores FP32 [first,seq] = float(masked).

    Both inputs name the same symbolic dimension ``seq``, as exported text models do:
    requests must send them with equal lengths (the Mul fails otherwise). A zero
    ``seq`` is a valid request with zero-element outputs. ``first`` fixes the first
    dimension instead of leaving it a batch dimension (e.g. 1, as some exporters do).
    """
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
            helper.make_node("Cast", ["masked"], ["scores"], to=TensorProto.FLOAT),
        ],
        "sequence",
        [
            _value("input_ids", TensorProto.INT64, [first, "seq"]),
            _value("attention_mask", TensorProto.INT64, [first, "seq"]),
        ],
        [
            _value("masked", TensorProto.INT64, [first, "seq"]),
            _value("scores", TensorProto.FLOAT, [first, "seq"]),
        ],
    )
    _save(graph, path)


def write_less_accurate_copy(source: Path, target: Path, points: float, heldout: Path) -> float:
    """The digits model with one class's bias raised until its accuracy on `heldout` (an .npz of X
    and y) is `points` lower; returns the drop. The rows it gets wrong that the source got right
    are rows it now calls class 0: the two disagree (almost) one way only."""
    model = onnx.load(str(source))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    data = np.load(heldout)
    logits = (data["X"] * weights["pixel_scale"]) @ weights["w1"]

    def accuracy(bias: np.ndarray) -> float:
        return float(np.mean(np.argmax(logits + bias, axis=1) == data["y"]))

    base = accuracy(weights["b1"])
    low, high = 0.0, 50.0
    for _ in range(60):
        shift = (low + high) / 2
        bias = weights["b1"].copy()
        bias[0] += shift
        if base - accuracy(bias) < points / 100:
            low = shift
        else:
            high = shift
    bias = weights["b1"].copy()
    bias[0] += high
    for i, init in enumerate(model.graph.initializer):
        if init.name == "b1":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), "b1"))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return base - accuracy(bias)
