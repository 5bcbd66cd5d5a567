"""The weight store (one read-only shared segment) and Engine's loading of models through it.

Every numeric check compares the engine's outputs with numpy computed from the model's own
weights; every sharing check looks at the catalog, the skeleton and the segment's bytes.
"""

from __future__ import annotations

import fcntl
import mmap
import os

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import make_mlp
from onnx import TensorProto, helper, numpy_helper

import shmengine
from models.builders import save_model
from shmengine.model.weights import INLINE_LIMIT, WeightStore
from shmengine.runtime.placement import place_workers
from shmengine.runtime.pool import WorkerPool
from shmengine.runtime.sharedmem import ALIGNMENT
from shmengine.runtime.worker import ProgramSpec

RTOL = 1e-4
ATOL = 1e-6


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="shmengine.tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _segment_array(store: WeightStore, entry) -> np.ndarray:
    """A private copy of one shared tensor's bytes as they lie in the segment."""
    dtype = np.dtype(np.float32) if entry.elem_type == TensorProto.FLOAT else np.dtype(np.uint16)
    view = np.frombuffer(store.segment.buffer, dtype=dtype, count=entry.nbytes // dtype.itemsize, offset=entry.offset)
    copy = view.reshape(entry.shape).copy()
    del view  # a live view would keep the segment's memoryview exported and block close()
    return copy


# -- the store: what is shared, where, and what stays in the skeleton ---------------------------


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_store_shares_large_tensors_and_keeps_small_ones(tmp_path, external):
    mlp = make_mlp(tmp_path, [64, 128, 32], seed=3, external_data=external)
    if external:
        assert (tmp_path / "model.onnx.data").stat().st_size >= 64 * 128 * 4
        assert (tmp_path / "model.onnx").stat().st_size < 4096
    store = WeightStore.load({"model": mlp.path})
    try:
        entry = store.catalog["model"]
        arrays = {f"w{i}": w for i, (w, _) in enumerate(mlp.params)}
        arrays.update({f"b{i}": b for i, (_, b) in enumerate(mlp.params)})
        large = {name for name, a in arrays.items() if a.nbytes > INLINE_LIMIT}
        assert large == {"w0", "w1"}  # the biases (512 and 128 bytes) stay in the skeleton

        assert {t.name for t in entry.tensors} == large
        assert store.nbytes == sum(arrays[name].nbytes for name in large) == 64 * 128 * 4 + 128 * 32 * 4
        for tensor in entry.tensors:
            assert tensor.offset % ALIGNMENT == 0
            assert tensor.shape == arrays[tensor.name].shape
            np.testing.assert_array_equal(_segment_array(store, tensor), arrays[tensor.name])
        spans = sorted((t.offset, t.offset + t.nbytes) for t in entry.tensors)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans

        assert [s.name for s in entry.inputs] == ["x"]
        assert entry.inputs[0].shape == ("batch", 64)
        assert [s.name for s in entry.outputs] == ["y"]
        assert entry.outputs[0].shape == ("batch", 32)
    finally:
        store.close()


def test_skeleton_holds_no_shared_bytes(tmp_path):
    mlp = make_mlp(tmp_path, [256, 512, 256], seed=4)
    store = WeightStore.load({"model": mlp.path})
    try:
        entry = store.catalog["model"]
        assert store.nbytes == 2 * 256 * 512 * 4
        assert len(entry.skeleton) < 4096 < store.nbytes // 100

        skeleton = onnx.load_from_string(entry.skeleton)
        by_name = {t.name: t for t in skeleton.graph.initializer}
        for tensor in entry.tensors:
            proto = by_name[tensor.name]
            assert not proto.HasField("raw_data") and not proto.float_data
            assert proto.data_location == TensorProto.EXTERNAL
            info = {e.key: e.value for e in proto.external_data}
            assert info == {"location": store.segment.name, "offset": str(tensor.offset), "length": str(tensor.nbytes)}
        # the small tensors (biases) stay inline with their bytes
        np.testing.assert_array_equal(numpy_helper.to_array(by_name["b0"]), mlp.params[0][1])
    finally:
        store.close()


def test_two_models_in_one_segment(tmp_path):
    a = make_mlp(tmp_path / "a", [64, 128, 32], seed=5)
    b = make_mlp(tmp_path / "b", [32, 64, 16], seed=6, external_data=True)
    store = WeightStore.load({"a": a.path, "b": b.path})
    try:
        spans = sorted((t.offset, t.offset + t.nbytes) for e in store.catalog.values() for t in e.tensors)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans
        for key, mlp in (("a", a), ("b", b)):
            weights = {f"w{i}": w for i, (w, _) in enumerate(mlp.params)}
            entry = store.catalog[key]
            assert entry.tensors and {t.name for t in entry.tensors} <= set(weights)
            for tensor in entry.tensors:
                np.testing.assert_array_equal(_segment_array(store, tensor), weights[tensor.name])
        assert store.nbytes == store.catalog["a"].shared_bytes + store.catalog["b"].shared_bytes
    finally:
        store.close()


# -- the engine computes the right numbers -------------------------------------------------------


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_engine_matches_numpy_reference(tmp_path, external):
    mlp = make_mlp(tmp_path, [64, 128, 32], seed=7, external_data=external)
    inter = 2 if external else 1
    with shmengine.Engine(mlp.path, inter_threads=inter) as engine:
        assert engine.weights_nbytes == 64 * 128 * 4 + 128 * 32 * 4
        assert engine.num_workers == inter
        x = mlp.inputs(5, seed=1)
        out = engine.run_batch({"x": x})
        assert set(out) == {"y"}
        assert out["y"].dtype == np.float32 and out["y"].shape == (5, 32)
        np.testing.assert_allclose(out["y"], mlp.reference(x), rtol=RTOL, atol=ATOL)
        # several batches at once (on two workers for the external-data model)
        xs = [mlp.inputs(n, seed=10 + n) for n in (1, 3, 8, 2)]
        outs = engine.run_batch([{"x": xi} for xi in xs])
        for xi, oi in zip(xs, outs):
            np.testing.assert_allclose(oi["y"], mlp.reference(xi), rtol=RTOL, atol=ATOL)


def _cast_matmul_model(weight: TensorProto, width_in: int, width_out: int) -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Cast", [weight.name], ["w_f32"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w_f32"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width_out])],
        [weight],
    )


@pytest.mark.parametrize("level", ["all", "disable"])
def test_float16_weights(tmp_path, level):
    """A float16 weight behind a Cast: with level 'all', ORT folds the Cast, reading the bytes by path."""
    rng = np.random.default_rng(8)
    w16 = (rng.standard_normal((64, 48)) / 8).astype(np.float16)  # 6 KiB: shared
    save_model(_cast_matmul_model(numpy_helper.from_array(w16, "w16"), 64, 48), tmp_path)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ w16.astype(np.float64)
    with shmengine.Engine(tmp_path, graph_optimization_level=level) as engine:
        assert engine.weights_nbytes == w16.nbytes
        y = engine.run_batch({"x": x})["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


def test_bfloat16_weights(tmp_path):
    rng = np.random.default_rng(9)
    full = rng.standard_normal((64, 40)).astype(np.float32) / 8
    bits = (full.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 by truncation
    rounded = (bits.astype(np.uint32) << 16).view(np.float32)
    weight = helper.make_tensor("wbf16", TensorProto.BFLOAT16, [64, 40], vals=bits.tobytes(), raw=True)
    model = _cast_matmul_model(weight, 64, 40)
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # pragma: no cover - depends on the ORT build
        pytest.skip(f"this ONNX Runtime cannot run a bfloat16 Cast: {exc}")
    save_model(model, tmp_path)

    store = WeightStore.load({"model": tmp_path})
    try:
        (entry,) = store.catalog["model"].tensors
        assert (entry.name, entry.elem_type, entry.nbytes) == ("wbf16", TensorProto.BFLOAT16, bits.nbytes)
        np.testing.assert_array_equal(_segment_array(store, entry), bits)
    finally:
        store.close()

    x = rng.standard_normal((4, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ rounded.astype(np.float64)
    with shmengine.Engine(tmp_path) as engine:
        y = engine.run_batch({"x": x})["y"]
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


# -- initializers of subgraphs -------------------------------------------------------------------


def _if_model(rng):
    """``y = If(cond, then: (x @ M) @ Wt, else: (x @ M') @ We)``.

    Wt and We (8 KiB each) are defined once: the store can share them. Both branches name their
    16 KiB matrix ``M``; that name is defined twice, so those must stay where they are.
    """
    wt, we = (rng.standard_normal((64, 32)).astype(np.float32) for _ in range(2))
    mt, me = ((rng.standard_normal((64, 64)) / 8).astype(np.float32) for _ in range(2))

    def branch(label, m, w):
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "M"], [f"{label}_h"]),
                helper.make_node("MatMul", [f"{label}_h", f"W{label}"], [f"{label}_y"]),
            ],
            f"{label}_branch",
            [],
            [helper.make_tensor_value_info(f"{label}_y", TensorProto.FLOAT, ["batch", 32])],
            [numpy_helper.from_array(m, "M"), numpy_helper.from_array(w, f"W{label}")],
        )

    model = _model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("t", mt, wt), else_branch=branch("e", me, we))],
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [],
    )
    return model, (mt, wt), (me, we)


def test_if_subgraph_initializers_are_shared(tmp_path):
    rng = np.random.default_rng(10)
    model, (mt, wt), (me, we) = _if_model(rng)
    assert all(
        len(g.initializer) == 2 for g in (model.graph.node[0].attribute[0].g, model.graph.node[0].attribute[1].g)
    )
    save_model(model, tmp_path)

    store = WeightStore.load({"model": tmp_path})
    try:
        entry = store.catalog["model"]
        names = {t.name for t in entry.tensors}
        assert {"Wt", "We"} <= names
        for tensor in entry.tensors:
            if tensor.name in ("Wt", "We"):
                np.testing.assert_array_equal(_segment_array(store, tensor), wt if tensor.name == "Wt" else we)
        assert store.nbytes >= wt.nbytes + we.nbytes
        # in the skeleton, Wt and We now live in the main graph as external data (in the segment)
        skeleton = onnx.load_from_string(entry.skeleton)
        main = {t.name: t for t in skeleton.graph.initializer}
        assert {"Wt", "We"} <= set(main)
        assert all(main[n].data_location == TensorProto.EXTERNAL for n in ("Wt", "We"))
        branches = [a.g for a in skeleton.graph.node[0].attribute]
        assert all({"Wt", "We"}.isdisjoint(t.name for t in g.initializer) for g in branches)
        assert [s.name for s in entry.inputs] == ["cond", "x"]
    finally:
        store.close()

    x = rng.standard_normal((3, 64)).astype(np.float32)
    x64 = x.astype(np.float64)
    with shmengine.Engine(tmp_path) as engine:
        y_then = engine.run_batch({"cond": np.array(True), "x": x})["y"]
        y_else = engine.run_batch({"cond": np.array(False), "x": x})["y"]
    np.testing.assert_allclose(y_then, x64 @ mt @ wt, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(y_else, x64 @ me @ we, rtol=RTOL, atol=1e-5)
    assert not np.allclose(y_then, y_else)


# -- read-only for everyone ----------------------------------------------------------------------


def test_segment_is_read_only_in_the_supervisor(small_mlp):
    store = WeightStore.load({"model": small_mlp.path})
    try:
        buffer = store.segment.buffer
        assert buffer.readonly
        tensor = store.catalog["model"].tensors[0]
        with pytest.raises(TypeError):
            buffer[tensor.offset] = 0
        view = np.frombuffer(buffer, dtype=np.float32, count=4, offset=tensor.offset)
        try:
            assert not view.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                view[0] = 1.0
            with pytest.raises(ValueError):
                view.setflags(write=True)
        finally:
            del view

        mode = os.stat(store.segment.path).st_mode & 0o777
        assert mode == 0o400, oct(mode)
        if os.geteuid() != 0:  # root ignores file modes
            with pytest.raises(PermissionError):
                os.open(store.segment.path, os.O_RDWR)
        np.testing.assert_array_equal(_segment_array(store, tensor), small_mlp.params[0][0])
    finally:
        store.close()


class SegmentProbe:
    """A worker program (run in a worker forked by the pool) that tries to write the weights."""

    def __init__(self, context, model_key: str = "model"):
        self.segment = context._segment
        self.tensor = next(t for t in context.catalog[model_key].tensors if t.name == "w0")

    def _view(self) -> np.ndarray:
        t = self.tensor
        return np.frombuffer(self.segment.buffer, dtype=np.float32, count=t.nbytes // 4, offset=t.offset).reshape(
            t.shape
        )

    def run(self, method, payload):
        if method == "checksum":
            return float(self._view().astype(np.float64).sum()), os.getpid()
        if method == "write_numpy":
            view = self._view()
            view[0, 0] = 12345.0  # must raise: the mapping is read-only
            return "written"
        if method == "unlock_numpy":
            view = self._view()
            view.setflags(write=True)  # must raise: the buffer underneath is read-only
            return "unlocked"
        if method == "fd_access_mode":
            return fcntl.fcntl(self.segment.fd, fcntl.F_GETFL) & os.O_ACCMODE
        if method == "map_writable":
            m = mmap.mmap(
                self.segment.fd, self.segment.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            m.close()
            return "mapped writable"
        if method == "write_fd":
            return os.pwrite(self.segment.fd, b"\0", self.tensor.offset)
        raise ValueError(f"unknown method {method!r}")


def _probe_pool(store: WeightStore) -> WorkerPool:
    return WorkerPool(store, ProgramSpec(__name__, "SegmentProbe"), place_workers("cpu").slots)


def test_worker_cannot_write_weights_through_its_mapping(small_mlp):
    w0 = small_mlp.params[0][0]
    store = WeightStore.load({"model": small_mlp.path})
    try:
        pool = _probe_pool(store)
        try:
            checksum, pid = pool.submit("checksum", None).result(timeout=30)
            assert checksum == pytest.approx(float(w0.astype(np.float64).sum()), rel=1e-12)
            with pytest.raises(ValueError, match="read-only") as info:
                pool.submit("write_numpy", None).result(timeout=30)
            assert isinstance(info.value.__cause__, shmengine.errors.RemoteTraceback)
            assert "view[0, 0] = 12345.0" in info.value.__cause__.tb
            with pytest.raises(ValueError):
                pool.submit("unlock_numpy", None).result(timeout=30)
            # the weights are intact, and the same worker goes on serving
            assert pool.submit("checksum", None).result(timeout=30) == (checksum, pid)
            assert pool.worker_pids() == [pid]
        finally:
            pool.close()
        np.testing.assert_array_equal(_segment_array(store, store.catalog["model"].tensors[0]), w0)
    finally:
        store.close()


def test_worker_cannot_map_the_segment_writable(small_mlp):
    store = WeightStore.load({"model": small_mlp.path})
    try:
        pool = _probe_pool(store)
        try:
            with pytest.raises(PermissionError):
                pool.submit("map_writable", None).result(timeout=30)
            with pytest.raises(OSError):
                pool.submit("write_fd", None).result(timeout=30)
            assert pool.submit("fd_access_mode", None).result(timeout=30) == os.O_RDONLY
        finally:
            pool.close()
    finally:
        store.close()


def test_the_same_tensor_in_two_graphs_is_stored_once(tmp_path):
    """A seq2seq export's encoder and decoder both carry the embedding: one copy in the segment."""
    rng = np.random.default_rng(11)
    shared = rng.standard_normal((512, 640)).astype(np.float32)  # 1.25 MiB, in both graphs
    outputs = {}
    for name, own in (("a", rng.standard_normal((640, 8)).astype(np.float32)),
                      ("b", rng.standard_normal((640, 8)).astype(np.float32))):
        model = _model(
            [helper.make_node("MatMul", ["x", "shared"], ["h"]), helper.make_node("MatMul", ["h", "own"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 512])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
            [numpy_helper.from_array(shared, "shared"), numpy_helper.from_array(own, "own")],
        )
        save_model(model, tmp_path / name)
        outputs[name] = own
    store = WeightStore.load({"a": tmp_path / "a", "b": tmp_path / "b"})
    try:
        offsets = {key: {t.name: t.offset for t in entry.tensors} for key, entry in store.catalog.items()}
        assert offsets["a"]["shared"] == offsets["b"]["shared"]
        assert offsets["a"]["own"] != offsets["b"]["own"]
        assert store.nbytes == shared.nbytes + 2 * outputs["a"].nbytes
        assert store.segment.size < 2 * shared.nbytes
    finally:
        store.close()
    x = rng.standard_normal((3, 512)).astype(np.float32)
    for key in ("a", "b"):
        with shmengine.Engine(tmp_path / key) as engine:
            np.testing.assert_allclose(engine.run_batch({"x": x})["y"], x @ shared @ outputs[key], rtol=1e-4, atol=1e-4)
