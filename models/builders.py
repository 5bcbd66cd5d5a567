"""Builders of small ONNX models for the default model, the tests and the benchmarks.

Every builder is deterministic (seeded) and writes IR version 9 (ONNX Runtime 1.31 reads at most
13; onnx 1.23 would write 14 by default).

Run ``python -m shmengine.models.builders default`` to rebuild the bundled default model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["mlp_model", "save_model", "ir_version"]

IR_VERSION = 9
OPSET = 17


def ir_version() -> int:
    return IR_VERSION


def mlp_model(
    widths: list[int],
    *,
    seed: int = 0,
    dtype=np.float32,
    activation: str = "Relu",
    scale: float | None = None,
    name: str = "mlp",
) -> tuple[onnx.ModelProto, list[tuple[np.ndarray, np.ndarray]]]:
    """An MLP ``x[batch, widths[0]] -> y[batch, widths[-1]]``: MatMul + Add + activation per layer.

    Returns the model and its ``(weight, bias)`` arrays so that a test can compute the expected
    output with numpy. ``scale`` defaults to 1/sqrt(fan-in), which keeps activations near 1.
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, params = [], [], []
    current = "x"
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        w = (rng.standard_normal((fan_in, fan_out)) * s).astype(dtype)
        b = (rng.standard_normal(fan_out) * 0.1).astype(dtype)
        params.append((w, b))
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        last = i == len(widths) - 2
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out if last or activation is None else f"a{i}"]))
        if not last and activation is not None:
            nodes.append(helper.make_node(activation, [f"a{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", elem, ["batch", widths[0]])],
        [helper.make_tensor_value_info("y", elem, ["batch", widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="shmengine.models")
    model.ir_version = IR_VERSION
    return model, params


def mlp_reference(x: np.ndarray, params, activation: str = "Relu") -> np.ndarray:
    """numpy forward pass of :func:`mlp_model` (the independent reference for tests)."""
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1 and activation == "Relu":
            h = np.maximum(h, 0)
    return h


def save_model(model: onnx.ModelProto, directory: str | Path, *, external_data: bool = False) -> Path:
    """Write ``model.onnx`` into ``directory`` (weights in ``model.onnx.data`` if asked)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return path


def build_default(directory: str | Path | None = None) -> Path:
    """The bundled default model: a 256 -> 512 -> 512 -> 256 MLP (about 2 MiB of weights)."""
    model, _ = mlp_model([256, 512, 512, 256], seed=1984, name="shmengine-default-mlp")
    return save_model(model, directory or Path(__file__).resolve().parent / "default")


if __name__ == "__main__":
    if sys.argv[1:] != ["default"]:
        sys.exit("usage: python -m shmengine.models.builders default")
    print(build_default())
