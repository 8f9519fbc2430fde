"""Outputs the protocol cannot carry (issue #21 item 18).

Our choice: a model is served without such outputs, with a warning naming them and
the fix (scikit-learn's ZipMap: `zipmap: False` in skl2onnx's options); a model with
no servable output at all is refused, which stops startup like any bad model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper

from tests.integration.test_model_lifecycle_repository import digits_answer, serve
from tests.support import MODELS, gateway_in_thread


def write_zipmap_classifier(path: Path, with_label: bool = True) -> None:
    """A scikit-learn-style classifier as skl2onnx writes it by default: a label tensor
    and the probabilities as ZipMap's `seq(map(int64, tensor(float)))`."""
    classes = [0, 1, 2]
    features = 4
    weights = np.linspace(-1.0, 1.0, len(classes) * features).astype(np.float32)
    nodes = [
        helper.make_node(
            "LinearClassifier",
            ["input"],
            ["label", "scores"],
            domain="ai.onnx.ml",
            coefficients=weights.tolist(),
            intercepts=[0.1, 0.0, -0.1],
            classlabels_ints=classes,
            post_transform="SOFTMAX",
        ),
        helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=classes),
    ]
    zipped = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    outputs = [helper.make_value_info("probabilities", zipped)]
    if with_label:
        outputs.insert(0, helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]))
    graph = helper.make_graph(
        nodes,
        "zipmap_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def test_a_zipmap_output_is_skipped_with_a_warning_and_the_rest_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "repo"
    write_zipmap_classifier(root / "iris" / "1" / "model.onnx")
    (root / "iris" / "model.toml").write_text("max_batch_size = 8\n")
    shutil.copytree(MODELS / "digits", root / "digits")
    with caplog.at_level(logging.WARNING), gateway_in_thread(root, controller=False) as running:
        client = tc.InferenceServerClient(running.address)
        metadata = client.get_model_metadata("iris", as_json=True)
        assert [o["name"] for o in metadata["outputs"]] == ["label"]
        inp = tc.InferInput("input", [3, 4], "FP32")
        inp.set_data_from_numpy(np.arange(12, dtype=np.float32).reshape(3, 4))
        labels = client.infer("iris", [inp]).as_numpy("label")
        assert labels is not None and labels.shape == (3,) and set(labels.tolist()) <= {0, 1, 2}
        digits_answer(running)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'probabilities'" in w and "zipmap" in w for w in warnings), warnings


def test_a_model_with_no_servable_output_is_refused_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    write_zipmap_classifier(root / "iris" / "1" / "model.onnx", with_label=False)
    result = serve("--models", str(root), "--workers", "1")
    assert result.returncode == 2, result.stderr
    assert "iris/1/model.onnx" in result.stderr and "'probabilities'" in result.stderr
    assert "'zipmap': False" in result.stderr
