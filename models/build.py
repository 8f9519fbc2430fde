"""Build the bundled ONNX models and their ``model.toml`` specs.

Run from the repository root::

    python models/build.py            # writes into models/
    python models/build.py --out DIR  # writes somewhere else

Every graph is assembled by hand with ``onnx.helper`` so that the exact
tensor names, dtypes and shapes are under our control, and every random
choice uses a fixed seed so that re-running produces byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Layer = tuple[F64, F64]  # (weight [in, out], bias [out]) as trained by sklearn

# Opset 17 / IR 8 is what onnx 1.12 emitted; every onnxruntime >= 1.12
# (including the 1.31 we deploy) loads it, so the files stay portable.
OPSET: Final = 17
IR_VERSION: Final = 8
PRODUCER: Final = "models/build.py"

# The digits pixels are integers 0..16; the graph itself scales them so that
# clients can send raw pixel values.  1/16 is exact in float32 and float64,
# which keeps the ONNX output and sklearn's predict_proba in lock-step.
PIXEL_SCALE: Final = 1.0 / 16.0
N_CLASSES: Final = 10
SPLIT_SEED: Final = 0
SKLEARN_SEED: Final = 0
NOISE_SEED: Final = 3
NOISE_FRACTION: Final = 0.4
MLP_SEED: Final = 1
CONVNET_SEED: Final = 2
PROBA_ATOL: Final = 1e-5

BATCH: Final = "batch"


@dataclass(frozen=True)
class Spec:
    """The handful of values that differ between the models' model.toml."""

    description: str
    max_batch_size: int
    output: str


SPECS: Final = {
    "digits": Spec(
        "8x8 handwritten digit classifier (scikit-learn digits); v1 linear, v2 MLP, v3 deliberately degraded linear",
        256,
        "probabilities",
    ),
    "mlp": Spec(
        "Benchmark MLP 784-1024-1024-1024-10 with fixed random weights",
        512,
        "logits",
    ),
    "convnet": Spec(
        "Benchmark small convnet on 1x28x28 images with fixed random weights",
        128,
        "logits",
    ),
}


@dataclass(frozen=True)
class DigitsSplit:
    """Raw (unscaled 0..16) pixels and labels of the train/held-out split."""

    x_train: F64
    x_test: F64
    y_train: I64
    y_test: I64


# --------------------------------------------------------------------------
# Generic ONNX plumbing
# --------------------------------------------------------------------------


def _tensor(name: str, array: npt.NDArray[np.generic]) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        # A fixed string rather than the onnx version: the file must not
        # change just because a different onnx wheel wrote it.
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    return model


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    # full_check runs strict shape inference so a wiring mistake fails here
    # rather than at serving time.
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the GPU wheel warns about missing CUDA
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, feeds: dict[str, npt.NDArray[np.generic]]) -> list[np.ndarray]:
    outputs = _session(path).run(None, feeds)
    return [np.asarray(o) for o in outputs]


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> F32:
    # He-normal keeps activations O(1) through the ReLU stack, so benchmark
    # outputs stay finite and comparisons between versions are meaningful.
    scale = float(np.sqrt(2.0 / fan_in))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _progress(path: Path, note: str = "") -> None:
    size = path.stat().st_size
    suffix = f"  {note}" if note else ""
    print(f"wrote {path} ({size:,} bytes){suffix}", flush=True)


# --------------------------------------------------------------------------
# model.toml and the deterministic .npz
# --------------------------------------------------------------------------


def spec_text(spec: Spec) -> str:
    """Render one model.toml; the layout is fixed, only three values vary."""
    return (
        f"# {spec.description}\n"
        f"max_batch_size = {spec.max_batch_size}\n"
        "\n"
        "[batching]\n"
        "enabled = true\n"
        "max_queue_delay_us = 500\n"
        "preferred_batch_sizes = []\n"
        "max_queue_size = 4096\n"
        "# One batch at a time per worker on the CPU: a second one only competes for the\n"
        "# same cores, while waiting lets the next batch grow (measured: +17% on mlp).\n"
        "instances = 1\n"
        "default_timeout_us = 0\n"
        "\n"
        "[compare]\n"
        'kind = "classification"\n'
        f'output = "{spec.output}"\n'
        "atol = 1e-5\n"
        "rtol = 1e-4\n"
        "\n"
        "[release]\n"
        'stable = "1"\n'
    )


def write_spec(out: Path, name: str) -> None:
    text = spec_text(SPECS[name])
    tomllib.loads(text)  # fail the build, not the gateway, on a TOML typo
    path = out / name / "model.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    _progress(path)


def write_npz(path: Path, arrays: dict[str, npt.NDArray[np.generic]]) -> None:
    """Write an ``np.load``-compatible .npz with byte-identical output.

    ``np.savez*`` stamps each member with the current time, so two runs differ;
    building the zip ourselves lets us pin the timestamp and attributes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, whichever OS runs the build
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def load_digits_split() -> DigitsSplit:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)
    return DigitsSplit(
        x_train=np.asarray(x_train, dtype=np.float64),
        x_test=np.asarray(x_test, dtype=np.float64),
        y_train=np.asarray(y_train, dtype=np.int64),
        y_test=np.asarray(y_test, dtype=np.int64),
    )


def corrupt_labels(labels: I64, fraction: float, seed: int) -> I64:
    """Return a copy with exactly ``fraction`` of the labels made wrong.

    Shifting by 1..9 (mod 10) guarantees the new label differs; a plain random
    draw would leave ~10% of the "corrupted" labels correct by chance.
    """
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    picked = rng.choice(labels.size, size=round(fraction * labels.size), replace=False)
    shift = rng.integers(1, N_CLASSES, size=picked.size)
    noisy[picked] = (noisy[picked] + shift) % N_CLASSES
    return noisy


def _fit_logistic(x: F64, y: I64) -> tuple[LogisticRegression, list[Layer]]:
    model = LogisticRegression(max_iter=5000, random_state=SKLEARN_SEED)
    model.fit(x * PIXEL_SCALE, y)
    return model, [(model.coef_.T, model.intercept_)]


def _fit_mlp(x: F64, y: I64) -> tuple[MLPClassifier, list[Layer]]:
    # 128 hidden units beat the linear model on the held-out split by a clear
    # margin for several seeds, not just a lucky one.
    model = MLPClassifier(
        hidden_layer_sizes=(128,),
        activation="relu",
        alpha=1e-3,
        max_iter=2000,
        random_state=SKLEARN_SEED,
    )
    model.fit(x * PIXEL_SCALE, y)
    if model.out_activation_ != "softmax":
        raise RuntimeError(f"unexpected MLP output activation {model.out_activation_}")
    return model, list(zip(model.coefs_, model.intercepts_, strict=True))


def classifier_graph(layers: Sequence[Layer], doc: str) -> onnx.ModelProto:
    """pixels -> *1/16 -> (MatMul+Add, Relu between layers) -> Softmax, ArgMax."""
    nodes = [helper.make_node("Mul", ["pixels", "pixel_scale"], ["h0"])]
    inits = [_tensor("pixel_scale", np.array(PIXEL_SCALE, dtype=np.float32))]
    current = "h0"
    for i, (weight, bias) in enumerate(layers, start=1):
        inits.append(_tensor(f"w{i}", weight.astype(np.float32)))
        inits.append(_tensor(f"b{i}", bias.astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"]))
        current = f"z{i}"
        if i < len(layers):
            nodes.append(helper.make_node("Relu", [current], [f"a{i}"]))
            current = f"a{i}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=1))
    nodes.append(helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0))
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [BATCH, 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [BATCH, N_CLASSES]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [BATCH]),
        ],
        initializer=inits,
    )
    return _make_model(graph, doc)


def check_digits(path: Path, estimator: LogisticRegression | MLPClassifier, split: DigitsSplit) -> float:
    """Compare ONNX to sklearn on the held-out split; return ONNX accuracy."""
    pixels = split.x_test.astype(np.float32)
    probabilities, label = _run(path, {"pixels": pixels})
    expected = estimator.predict_proba(split.x_test * PIXEL_SCALE)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=PROBA_ATOL)
    if label.dtype != np.int64 or not np.array_equal(label, probabilities.argmax(axis=1)):
        raise RuntimeError(f"{path}: label output disagrees with probabilities")
    return float(np.mean(label == split.y_test))


def build_digits(out: Path) -> None:
    split = load_digits_split()
    noisy = corrupt_labels(split.y_train, NOISE_FRACTION, NOISE_SEED)
    fitted: dict[int, tuple[LogisticRegression | MLPClassifier, list[Layer], str]] = {}
    fitted[1] = (*_fit_logistic(split.x_train, split.y_train), "logistic regression")
    fitted[2] = (*_fit_mlp(split.x_train, split.y_train), "MLP 64-128-10, relu")
    fitted[3] = (
        *_fit_logistic(split.x_train, noisy),
        f"logistic regression, {NOISE_FRACTION:.0%} of training labels corrupted",
    )

    accuracy: dict[int, float] = {}
    for version, (estimator, layers, doc) in fitted.items():
        path = out / "digits" / str(version) / "model.onnx"
        _save_model(classifier_graph(layers, f"digits v{version}: {doc}"), path)
        accuracy[version] = check_digits(path, estimator, split)
        n = split.y_test.size
        _progress(path, f"held-out accuracy {accuracy[version]:.4f} (n={n})")

    if not accuracy[2] > accuracy[1] > accuracy[3]:
        raise RuntimeError(f"digits accuracies out of order: {accuracy}")

    heldout = out / "digits" / "heldout.npz"
    write_npz(heldout, {"X": split.x_test.astype(np.float32), "y": split.y_test})
    _progress(heldout)
    write_spec(out, "digits")


# --------------------------------------------------------------------------
# benchmark models
# --------------------------------------------------------------------------


def mlp_graph(seed: int) -> tuple[onnx.ModelProto, list[tuple[F32, F32]]]:
    """784 -> 3 x (Gemm 1024 + Relu) -> Gemm 10; also returns the weights."""
    rng = np.random.default_rng(seed)
    sizes = [784, 1024, 1024, 1024, N_CLASSES]
    weights: list[tuple[F32, F32]] = []
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    current = "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), 1):
        w = _he_normal(rng, (fan_in, fan_out), fan_in)
        # Zero biases, as a freshly initialised network would have.
        b = np.zeros(fan_out, dtype=np.float32)
        weights.append((w, b))
        inits += [_tensor(f"fc{i}.weight", w), _tensor(f"fc{i}.bias", b)]
        last = i == len(sizes) - 1
        gemm_out = "logits" if last else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [gemm_out]))
        current = gemm_out
        if not last:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH, 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, N_CLASSES])],
        initializer=inits,
    )
    return _make_model(graph, "benchmark MLP, random He-normal weights"), weights


def mlp_reference(x: F32, weights: Sequence[tuple[F32, F32]]) -> F32:
    h = x
    for i, (w, b) in enumerate(weights, 1):
        h = h @ w + b
        if i < len(weights):
            h = np.maximum(h, 0)
    return h


def build_mlp(out: Path) -> None:
    model, weights = mlp_graph(MLP_SEED)
    path = out / "mlp" / "1" / "model.onnx"
    _save_model(model, path)
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    (logits,) = _run(path, {"input": x})
    np.testing.assert_allclose(logits, mlp_reference(x, weights), rtol=1e-4, atol=1e-4)
    _progress(path, "matches numpy reference")
    write_spec(out, "mlp")


def _conv3x3(src: str, prefix: str, dst: str) -> onnx.NodeProto:
    # pad 1 keeps the spatial size, so only the pools halve it (28 -> 14 -> 7).
    return helper.make_node(
        "Conv",
        [src, f"{prefix}.weight", f"{prefix}.bias"],
        [dst],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )


def _maxpool2x2(src: str, dst: str) -> onnx.NodeProto:
    return helper.make_node("MaxPool", [src], [dst], kernel_shape=[2, 2], strides=[2, 2])


def convnet_graph(seed: int) -> onnx.ModelProto:
    """(Conv3x3+Relu+MaxPool2) x 2 -> Flatten -> Gemm 10 on 1x28x28 input."""
    rng = np.random.default_rng(seed)
    conv1 = _he_normal(rng, (16, 1, 3, 3), 1 * 9)
    conv2 = _he_normal(rng, (32, 16, 3, 3), 16 * 9)
    fc = _he_normal(rng, (32 * 7 * 7, N_CLASSES), 32 * 7 * 7)
    inits = [
        _tensor("conv1.weight", conv1),
        _tensor("conv1.bias", np.zeros(16, dtype=np.float32)),
        _tensor("conv2.weight", conv2),
        _tensor("conv2.bias", np.zeros(32, dtype=np.float32)),
        _tensor("fc.weight", fc),
        _tensor("fc.bias", np.zeros(N_CLASSES, dtype=np.float32)),
    ]
    nodes = [
        _conv3x3("image", "conv1", "c1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        _maxpool2x2("r1", "p1"),  # 16x14x14
        _conv3x3("p1", "conv2", "c2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        _maxpool2x2("r2", "p2"),  # 32x7x7
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, N_CLASSES])],
        initializer=inits,
    )
    return _make_model(graph, "benchmark convnet, random He-normal weights")


def build_convnet(out: Path) -> None:
    path = out / "convnet" / "1" / "model.onnx"
    _save_model(convnet_graph(CONVNET_SEED), path)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    (logits,) = _run(path, {"image": x})
    if logits.shape != (3, N_CLASSES) or not np.all(np.isfinite(logits)):
        raise RuntimeError(f"{path}: bad logits shape/values {logits.shape}")
    _progress(path, "runs, logits finite")
    write_spec(out, "convnet")


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the bundled ONNX models (digits, mlp, convnet) "
        "and their model.toml specs, deterministically."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="model repository root to write into (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    started = time.perf_counter()
    # One BLAS thread: multi-threaded reductions may sum in a different order
    # from run to run, which would make the trained weights (and so the .onnx
    # bytes) differ in the last bits.
    with threadpool_limits(limits=1):
        build_digits(out)
        build_mlp(out)
        build_convnet(out)
    print(f"done in {time.perf_counter() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
