"""Bad input of every kind gets an exception that says what is wrong, and nothing breaks.

* Unusable model files raise ModelLoadError before any shared segment is allocated or any
  process is started (both are spied on, not only checked for leaks afterwards).
* Bad Engine arguments raise ValueError before anything is loaded.
* Bad feeds raise InvalidInputError in the caller; errors that only ORT can see come back from the
  worker with its traceback. Either way the engine keeps working, on the same workers.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import live_children, make_mlp, shm_segments, wait_until
from onnx import TensorProto, helper

import shmengine
from shmengine import InvalidInputError, ModelLoadError
from shmengine.errors import RemoteTraceback, ShmEngineError, WorkerCrashedError
from shmengine.runtime.sharedmem import SharedSegment
from shmengine.runtime.zygote import ForkServer

RTOL = 1e-4
ATOL = 1e-6


def _snapshot() -> tuple[set[str], set[int]]:
    return shm_segments(), set(live_children())


def _closed_cleanly(before: tuple[set[str], set[int]]) -> None:
    """Nothing is left of what was created since ``before = _snapshot()``."""
    segments, children = before
    assert wait_until(lambda: not (shm_segments() - segments)), f"leaked segments: {shm_segments() - segments}"
    assert wait_until(lambda: not (set(live_children()) - children)), (
        f"leaked processes: {set(live_children()) - children}"
    )


@pytest.fixture(autouse=True)
def no_leaks():
    """Overrides conftest's check so that the module-scoped engine may live across tests.

    Whatever existed when a test started may remain; nothing new may. The engine
    fixtures check, when they close, that they left nothing behind either.
    """
    before = _snapshot()
    yield
    _closed_cleanly(before)


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="shmengine.tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _write(model: onnx.ModelProto, directory: Path) -> Path:
    """Write ``directory/model.onnx`` as is (external-data entries untouched, nothing else written)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


# -- spies: nothing allocated, nothing started --------------------------------------------------


@pytest.fixture
def spies(monkeypatch):
    """Record every shared-segment allocation and every fork-server start during a test."""
    calls = {"segments": [], "fork_servers": []}
    real_create = SharedSegment.create.__func__
    real_fork_server = ForkServer.__init__

    def create(cls, *args, **kwargs):
        calls["segments"].append(args)
        return real_create(cls, *args, **kwargs)

    def fork_server(self, *args, **kwargs):
        calls["fork_servers"].append(args)
        return real_fork_server(self, *args, **kwargs)

    monkeypatch.setattr(SharedSegment, "create", classmethod(create))
    monkeypatch.setattr(ForkServer, "__init__", fork_server)
    return calls


def _assert_refused(spies, make_engine, error, match):
    """``make_engine()`` raises ``error`` matching ``match`` without allocating or starting anything."""
    segments, children = shm_segments(), set(live_children())
    with pytest.raises(error, match=match) as info:
        with make_engine():
            pass
    assert spies == {"segments": [], "fork_servers": []}, "work was done before the input was refused"
    assert shm_segments() == segments
    assert set(live_children()) == children
    return info.value


def test_spies_see_a_normal_engine(spies, small_mlp):
    """The spies are not blind: a good model allocates one segment and starts one fork server."""
    before = _snapshot()
    with shmengine.Engine(small_mlp.path) as engine:
        x = small_mlp.inputs(2)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=RTOL, atol=ATOL)
    assert len(spies["segments"]) == 1 and len(spies["fork_servers"]) == 1
    _closed_cleanly(before)


# -- model files ---------------------------------------------------------------------------------


def test_missing_model_path(spies, tmp_path):
    path = tmp_path / "no" / "such" / "model.onnx"
    error = _assert_refused(spies, lambda: shmengine.Engine(path), ModelLoadError, "does not exist")
    assert str(path) in str(error)
    assert isinstance(error, ValueError) and isinstance(error, ShmEngineError)


def test_directory_without_onnx_file(spies, tmp_path):
    (tmp_path / "README.txt").write_text("no model here\n")
    error = _assert_refused(spies, lambda: shmengine.Engine(tmp_path), ModelLoadError, r"holds no \.onnx file")
    assert str(tmp_path) in str(error)


def test_directory_with_two_onnx_files(spies, tmp_path, small_mlp):
    for name in ("encoder.onnx", "decoder.onnx"):
        shutil.copy(small_mlp.path / "model.onnx", tmp_path / name)
    _assert_refused(
        spies,
        lambda: shmengine.Engine(tmp_path),
        ModelLoadError,
        r"several \.onnx files \(decoder\.onnx, encoder\.onnx\); name the file to load",
    )
    # naming one of them works
    with shmengine.Engine(tmp_path / "encoder.onnx") as engine:
        x = small_mlp.inputs(2)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "content",
    [np.random.default_rng(0).bytes(4096), b"this is a text file, not an ONNX model\n" * 3],
    ids=["random-bytes", "text"],
)
def test_file_that_is_not_onnx(spies, tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    error = _assert_refused(spies, lambda: shmengine.Engine(path), ModelLoadError, "is not a readable ONNX model")
    assert str(path) in str(error)
    assert "DecodeError" in str(error)


def test_protobuf_without_graph(spies, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=9).SerializeToString())
    _assert_refused(spies, lambda: shmengine.Engine(path), ModelLoadError, "holds no ONNX graph")


def _external_mlp(directory: Path):
    """An external-data MLP in ``directory``, its loaded (data-less) proto, and its data file."""
    mlp = make_mlp(directory, [64, 128, 32], seed=11, external_data=True)
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    return mlp, model, directory / "model.onnx.data"


def _set_external(model: onnx.ModelProto, **values: str) -> None:
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key in values:
                    entry.value = values[entry.key]


def test_external_data_escaping_through_dotdot(spies, tmp_path):
    _, model, data = _external_mlp(tmp_path / "model")
    data.rename(tmp_path / "outside.bin")
    _set_external(model, location="../outside.bin")
    _write(model, tmp_path / "model")
    error = _assert_refused(
        spies, lambda: shmengine.Engine(tmp_path / "model"), ModelLoadError, "outside the model directory"
    )
    assert "'../outside.bin'" in str(error) and "refusing to read it" in str(error)


def test_external_data_at_an_absolute_path(spies, tmp_path):
    _, model, data = _external_mlp(tmp_path / "model")
    outside = tmp_path / "outside.bin"
    data.rename(outside)
    _set_external(model, location=str(outside))
    _write(model, tmp_path / "model")
    error = _assert_refused(spies, lambda: shmengine.Engine(tmp_path / "model"), ModelLoadError, "absolute path")
    assert str(outside) in str(error)


def test_external_data_through_a_symlink_pointing_outside(spies, tmp_path):
    _, _, data = _external_mlp(tmp_path / "model")
    outside = tmp_path / "elsewhere" / "weights.bin"
    outside.parent.mkdir()
    data.rename(outside)
    data.symlink_to(outside)
    assert data.is_symlink() and data.is_file()
    error = _assert_refused(
        spies, lambda: shmengine.Engine(tmp_path / "model"), ModelLoadError, "outside the model directory"
    )
    assert str(outside.resolve()) in str(error)


def test_external_data_through_a_symlink_inside_the_directory_is_fine(tmp_path):
    mlp, _, data = _external_mlp(tmp_path / "model")
    real = tmp_path / "model" / "blobs" / "weights.bin"
    real.parent.mkdir()
    data.rename(real)
    data.symlink_to(real)
    before = _snapshot()
    with shmengine.Engine(tmp_path / "model") as engine:
        x = mlp.inputs(3)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], mlp.reference(x), rtol=RTOL, atol=ATOL)
    _closed_cleanly(before)


def test_external_data_truncated(spies, tmp_path):
    _, _, data = _external_mlp(tmp_path / "model")
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    error = _assert_refused(spies, lambda: shmengine.Engine(tmp_path / "model"), ModelLoadError, "truncated")
    assert f"has only {size // 2} bytes" in str(error)


def test_external_data_file_missing(spies, tmp_path):
    _, _, data = _external_mlp(tmp_path / "model")
    data.unlink()
    error = _assert_refused(spies, lambda: shmengine.Engine(tmp_path / "model"), ModelLoadError, "which is missing")
    assert "model.onnx.data" in str(error)


def test_external_data_length_disagrees_with_shape(spies, tmp_path):
    _, model, _ = _external_mlp(tmp_path / "model")
    _set_external(model, length="100")
    _write(model, tmp_path / "model")
    _assert_refused(
        spies,
        lambda: shmengine.Engine(tmp_path / "model"),
        ModelLoadError,
        r"declares shape \(\d+, \d+\) \(\d+ bytes\) but its external data holds 100 bytes",
    )


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_absurd_initializer_shape(spies, tmp_path, external):
    make_mlp(tmp_path, [64, 128, 32], seed=12, external_data=external)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    w0 = next(t for t in model.graph.initializer if t.name == "w0")
    del w0.dims[:]
    w0.dims.extend([2**40, 2**40])
    _write(model, tmp_path)
    error = _assert_refused(spies, lambda: shmengine.Engine(tmp_path), ModelLoadError, "beyond anything loadable")
    assert "'w0'" in str(error) and "1099511627776" in str(error)


def test_negative_initializer_dimension(spies, tmp_path):
    make_mlp(tmp_path, [64, 128, 32], seed=12)
    model = onnx.load(str(tmp_path / "model.onnx"))
    w0 = next(t for t in model.graph.initializer if t.name == "w0")
    w0.dims[0] = -64
    _write(model, tmp_path)
    _assert_refused(spies, lambda: shmengine.Engine(tmp_path), ModelLoadError, r"'w0' .* negative dimension")


def test_inline_raw_data_shorter_than_shape(spies, tmp_path):
    make_mlp(tmp_path, [64, 128, 32], seed=12)
    model = onnx.load(str(tmp_path / "model.onnx"))
    w0 = next(t for t in model.graph.initializer if t.name == "w0")
    w0.raw_data = w0.raw_data[:1000]
    _write(model, tmp_path)
    _assert_refused(
        spies, lambda: shmengine.Engine(tmp_path), ModelLoadError, r"'w0' .* \(32768 bytes\) but holds 1000 bytes"
    )


def test_inline_float_data_shorter_than_shape(spies, tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], vals=np.ones(64 * 64, np.float32))
    del weight.float_data[10:]
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
            [weight],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    _write(model, tmp_path)
    _assert_refused(spies, lambda: shmengine.Engine(tmp_path), ModelLoadError, r"tensor 'w'")


# -- engine arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inter_threads": 0}, r"inter_threads must be an integer >= 1 .*got 0"),
        ({"inter_threads": -1}, r"inter_threads must be an integer >= 1 .*got -1"),
        ({"inter_threads": 1.5}, r"inter_threads must be an integer >= 1 .*got 1\.5"),
        ({"intra_threads": -1}, r"intra_threads must be an integer >= 0 .*got -1"),
        ({"device": "tpu"}, r"device must be one of 'cpu', 'cuda', 'auto', got 'tpu'"),
        ({"device_index": 1}, r"device_index=1 only has a meaning with device='cuda'"),
        ({"graph_optimization_level": "max"}, r"graph_optimization_level must be .*got 'max'"),
        ({"max_queued_batches": -2}, r"max_queued_batches must be -1 \(unlimited\), 0 \(automatic\) or > 0, got -2"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_bad_engine_arguments(spies, small_mlp, kwargs, match):
    _assert_refused(spies, lambda: shmengine.Engine(small_mlp.path, **kwargs), ValueError, match)


def test_cuda_without_a_gpu(spies, small_mlp):
    if shmengine.get_cuda_device_count() > 0:
        pytest.skip("this machine has a CUDA device")
    _assert_refused(
        spies, lambda: shmengine.Engine(small_mlp.path, device="cuda"), ValueError, r"no CUDA device is usable"
    )


# -- feeds ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_engine(small_mlp):
    before = _snapshot()
    with shmengine.Engine(small_mlp.path) as engine:
        yield engine
    _closed_cleanly(before)


@pytest.fixture
def add_engine(tmp_path_factory):
    """``s = a + b`` with a, b: float32 [batch, 8]."""
    directory = tmp_path_factory.mktemp("add")
    spec = ["batch", 8]
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["s"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, spec) for n in ("a", "b")],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, spec)],
    )
    _write(model, directory)
    before = _snapshot()
    with shmengine.Engine(directory) as engine:
        yield engine
    _closed_cleanly(before)


def _check_still_works(engine, mlp, pids):
    x = mlp.inputs(4, seed=99)
    np.testing.assert_allclose(engine.run_batch({"x": x})["y"], mlp.reference(x), rtol=RTOL, atol=ATOL)
    assert engine.worker_pids == pids


# (id, feeds built from a good float32 [3, 64] batch x, what the message must say)
BAD_FEEDS = [
    ("unknown-name", lambda x: {"X": x}, r"unknown input 'X'; the model's inputs are: x \(float, \[batch, 64\]\)"),
    ("extra-name", lambda x: {"x": x, "mask": x}, r"unknown input 'mask'"),
    ("missing", lambda x: {}, r"missing input 'x'; the model's inputs are: x \(float, \[batch, 64\]\)"),
    (
        "float64",
        lambda x: {"x": x.astype(np.float64)},
        r"input 'x' must be float \(float32\), got float64; convert it with array\.astype\(numpy\.float32\)",
    ),
    ("int64", lambda x: {"x": x.astype(np.int64)}, r"must be float \(float32\), got int64; .*astype\(numpy\.float32\)"),
    (
        "rank-3",
        lambda x: {"x": x[None]},
        r"input 'x' must have 2 dimensions x \(float, \[batch, 64\]\), got shape \(1, 3, 64\)",
    ),
    ("rank-1", lambda x: {"x": x[0]}, r"input 'x' must have 2 dimensions .*got shape \(64,\)"),
    ("fixed-dim", lambda x: {"x": x[:, :63]}, r"input 'x' must have size 64 on axis 1 .*got shape \(3, 63\)"),
    ("not-numeric", lambda x: {"x": "zero"}, r"input 'x' cannot be made a float array"),
    ("ragged-list", lambda x: {"x": [[1.0] * 64, [1.0] * 63]}, r"input 'x' cannot be made a float array"),
]


@pytest.mark.parametrize(("build", "match"), [c[1:] for c in BAD_FEEDS], ids=[c[0] for c in BAD_FEEDS])
def test_bad_feeds(mlp_engine, small_mlp, build, match):
    feeds = build(small_mlp.inputs(3))
    pids = mlp_engine.worker_pids
    with pytest.raises(InvalidInputError, match=match):
        mlp_engine.run_batch(feeds)
    # the same bad batch inside a list (asynchronous too) raises at the call, not from a future
    with pytest.raises(InvalidInputError, match=match):
        mlp_engine.run_batch([{"x": small_mlp.inputs(2)}, feeds], asynchronous=True)
    _check_still_works(mlp_engine, small_mlp, pids)


@pytest.mark.parametrize(
    "feeds",
    [np.zeros((3, 64), np.float32), ["x"], [None]],
    ids=["array", "list-of-str", "list-of-None"],
)
def test_batch_that_is_not_a_dict(mlp_engine, small_mlp, feeds):
    pids = mlp_engine.worker_pids
    with pytest.raises(
        InvalidInputError, match=r"a batch must be a dict of input name -> numpy array, got (ndarray|str|NoneType)"
    ):
        mlp_engine.run_batch(feeds)
    _check_still_works(mlp_engine, small_mlp, pids)


@pytest.mark.parametrize("feeds", [None, 42], ids=["None", "int"])
def test_feeds_that_are_not_iterable(mlp_engine, small_mlp, feeds):
    with pytest.raises(InvalidInputError, match="a batch must be a dict"):
        mlp_engine.run_batch(feeds)


def test_unknown_output_names(mlp_engine, small_mlp):
    pids = mlp_engine.worker_pids
    x = small_mlp.inputs(2)
    with pytest.raises(InvalidInputError, match=r"unknown output 'logits'; the model's outputs are: y"):
        mlp_engine.run_batch({"x": x}, output_names=["y", "logits"])
    assert set(mlp_engine.run_batch({"x": x}, output_names=["y"])) == {"y"}
    _check_still_works(mlp_engine, small_mlp, pids)


def test_list_feeds_are_converted(mlp_engine, small_mlp):
    """Not an error: nested lists of Python floats become float32 (the declared dtype)."""
    x = small_mlp.inputs(2)
    y = mlp_engine.run_batch({"x": x.tolist()})["y"]
    np.testing.assert_allclose(y, small_mlp.reference(x), rtol=RTOL, atol=ATOL)


def test_inputs_disagree_on_a_symbolic_dimension(add_engine):
    pids = add_engine.worker_pids
    rng = np.random.default_rng(13)
    a, b = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(
        InvalidInputError,
        match=re.escape("dimension 'batch' is 2 in input 'a' but 3 in input 'b'; inputs of one batch must agree on it"),
    ):
        add_engine.run_batch({"a": a, "b": b})
    with pytest.raises(
        InvalidInputError, match=r"missing input 'b'; the model's inputs are: a \(float, \[batch, 8\]\); b "
    ):
        add_engine.run_batch({"a": a})
    b2 = b[:2]
    np.testing.assert_array_equal(add_engine.run_batch({"a": a, "b": b2})["s"], a + b2)
    assert add_engine.worker_pids == pids


# -- errors only the worker can see --------------------------------------------------------------


@pytest.fixture
def reshape_engine(tmp_path_factory):
    """``y = Reshape(data, shape)``: whether a shape fits is known only when ORT runs it."""
    directory = tmp_path_factory.mktemp("reshape")
    model = _model(
        [helper.make_node("Reshape", ["data", "shape"], ["y"])],
        [
            helper.make_tensor_value_info("data", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
    )
    _write(model, directory)
    before = _snapshot()
    with shmengine.Engine(directory) as engine:
        yield engine
    _closed_cleanly(before)


def test_error_raised_inside_the_worker(reshape_engine):
    data = np.arange(12, dtype=np.float32)
    pids = reshape_engine.worker_pids
    assert len(pids) == 1

    future = reshape_engine.run_batch({"data": data, "shape": np.array([5, 5], np.int64)}, asynchronous=True)
    with pytest.raises(
        Exception, match=r"cannot be reshaped to the requested shape\. Input shape:\{12\}, requested shape:\{5,5\}"
    ) as info:
        future.result(timeout=30)
    error = info.value
    # ORT's own exception, rebuilt in the caller; not a crash of the worker
    assert type(error).__module__.startswith("onnxruntime"), type(error)
    assert not isinstance(error, (ShmEngineError, WorkerCrashedError))
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "shmengine/api/engine.py" in error.__cause__.tb and "session.run" in error.__cause__.tb
    assert "cannot be reshaped" in error.__cause__.tb

    # synchronous calls raise the same
    with pytest.raises(Exception, match=r"cannot be reshaped") as info:
        reshape_engine.run_batch({"data": data, "shape": np.array([7, -1], np.int64)})
    assert isinstance(info.value.__cause__, RemoteTraceback)

    # the engine still works, on the same worker
    y = reshape_engine.run_batch({"data": data, "shape": np.array([3, -1], np.int64)})["y"]
    np.testing.assert_array_equal(y, data.reshape(3, 4))
    assert reshape_engine.worker_pids == pids

    # the int64 input is checked in the caller
    with pytest.raises(InvalidInputError, match=r"input 'shape' must be int64 \(int64\), got int32"):
        reshape_engine.run_batch({"data": data, "shape": np.array([3, 4], np.int32)})
    with pytest.raises(InvalidInputError, match=r"input 'shape' must have size 2 on axis 0"):
        reshape_engine.run_batch({"data": data, "shape": np.array([3, 2, 2], np.int64)})
    y = reshape_engine.run_batch({"data": data, "shape": np.array([2, 6], np.int64)})["y"]
    np.testing.assert_array_equal(y, data.reshape(2, 6))
    assert reshape_engine.worker_pids == pids
