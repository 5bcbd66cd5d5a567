"""The worker's side of weight sharing: ONNX Runtime sessions whose initializers are shared pages.

Each shared tensor becomes a numpy view into the read-only segment, wrapped in an ``OrtValue``
without a copy and given to ORT through ``SessionOptions.add_initializer``. Two facts measured
on ORT 1.31 shape this module:

* ``add_external_initializers`` *copies* every tensor into each worker; ``add_initializer``
  uses the pages in place. Only the latter shares.
* ORT's graph optimizers read an initializer's bytes from its external-data *path*, not from the
  value given to ``add_initializer``; the skeleton therefore points at the segment's file.
* ORT keeps no reference to the ``OrtValue``\\ s given to ``add_initializer``: if they are
  garbage-collected the session reads freed memory and crashes. The session object holds them.

Weight *prepacking* (ORT re-lays MatMul weights for its kernels, about 1.8x faster at batch 8 on
GPT-2-sized models) makes a private copy per worker when each session does it. With
``prepack_weights=True`` it is done once instead: :class:`PrepackProgram`, run by a one-off
worker, saves the optimized graph with its prepacked initializers as files named after the
segment, on disk (``sharedmem.prepack_directory`` says why not in ``/dev/shm``); every worker
then loads that file, and ORT memory-maps the prepacked weights, so the pages are shared like
the segment's (measured: two workers, 471 MiB of shared pages and 67 MiB private each on
GPT-2-124M).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmengine.model.weights import RAW_ONNX_TYPES, ModelEntry, storage_dtype
from shmengine.runtime.sharedmem import SHM_DIR
from shmengine.runtime.target import WorkerTarget

__all__ = ["SessionSettings", "create_session", "PrepackProgram"]


@dataclass(frozen=True)
class SessionSettings:
    """How a worker configures each ONNX Runtime session (picklable: it travels to workers)."""

    intra_threads: int = 1
    allow_spinning: bool = False
    prepack_weights: bool = False
    providers: tuple[tuple[str, dict[str, Any]], ...] = (("CPUExecutionProvider", {}),)
    graph_optimization_level: str = "all"  # "disable" | "basic" | "extended" | "all"
    log_severity_level: int = 3  # ORT's own warnings are noise for users; errors still raise
    # ORT's CPU arena keeps the peak of every batch's activations and KV cache for the life of
    # the worker (~80 MiB per worker after a GPT-2-124M batch of 8); without it the memory goes
    # back to malloc and, trimmed after a long batch (worker.py), to the system. Same speed
    # measured on GPT-2-124M int8 (tools/bench_generate.py).
    cpu_mem_arena: bool = False
    extra_config: dict[str, str] = field(default_factory=dict)
    # store key -> optimized model file with serialized prepacked weights (see PrepackProgram)
    prepacked_models: dict[str, str] = field(default_factory=dict)
    # where the worker runs (device, compute type, rank): its programs choose their runner from it
    target: WorkerTarget = field(default_factory=WorkerTarget)
    # this GPU's one copy of the segment (device_weights.py), mapped instead of uploaded per worker
    device_weights: Any = None


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _base_options(settings: SessionSettings, external_folder: str = SHM_DIR):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_threads
    # One worker runs one graph at a time; parallelism across batches comes from more workers.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[settings.graph_optimization_level])
    options.log_severity_level = settings.log_severity_level
    options.enable_cpu_mem_arena = settings.cpu_mem_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    options.add_session_config_entry("session.disable_prepacking", "0" if settings.prepack_weights else "1")
    # The skeleton's external-data locations are relative to /dev/shm, where the segment lives
    # (a prepacked model's, to the directory it was written to).
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    for key, value in settings.extra_config.items():
        options.add_session_config_entry(key, value)
    return options


def _providers(settings: SessionSettings):
    from shmengine.runtime.cuda_stream import with_shared_stream

    names = [name for name, _ in settings.providers]
    return names, with_shared_stream(names, [dict(opts) for _, opts in settings.providers])


def create_session(entry: ModelEntry, weights: memoryview, settings: SessionSettings, *, save_prepacked_to: str | None = None):
    """An ``onnxruntime.InferenceSession`` for ``entry`` whose shared tensors live in ``weights``
    (or, when ``settings.prepacked_models`` names a file for it, loaded from that file)."""
    import onnxruntime as ort

    prepacked = settings.prepacked_models.get(entry.key)
    options = _base_options(settings, os.path.dirname(prepacked) if prepacked else SHM_DIR)
    if prepacked:
        # Already optimized and prepacked: ORT maps the weights from the file, shared by all.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        providers, provider_options = _providers(settings)
        return ort.InferenceSession(prepacked, options, providers=providers, provider_options=provider_options)
    if save_prepacked_to:
        directory, name = os.path.split(save_prepacked_to)
        options.optimized_model_filepath = save_prepacked_to
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")

    keep_alive = []
    on_device = set()
    if settings.device_weights is not None:
        from shmengine.runtime.device_weights import device_initializers

        for name, value, view in device_initializers(entry, settings.device_weights):
            options.add_initializer(name, value)
            keep_alive.append((value, view))
            on_device.add(name)
    for tensor in entry.tensors:
        if tensor.name in on_device:
            continue
        dtype = storage_dtype(tensor.elem_type)
        array = np.frombuffer(weights, dtype=dtype, count=tensor.nbytes // dtype.itemsize, offset=tensor.offset)
        array = array.reshape(tensor.shape)
        if tensor.elem_type in RAW_ONNX_TYPES:
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, tensor.elem_type)
        else:
            value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(tensor.name, value)
        keep_alive.append(value)

    providers, provider_options = _providers(settings)
    session = ort.InferenceSession(entry.skeleton, options, providers=providers, provider_options=provider_options)
    session._shmengine_initializers = keep_alive  # see the module docstring: ORT does not hold them
    return session


def _rename_shared_subgraph_initializers(path: str) -> None:
    """Give each subgraph's initializers names of their own in an optimized model ORT wrote.

    ORT's optimizer turns Constant nodes into initializers. An Optimum merged decoder has the
    same Constant names in both branches of its If (legal: each branch is its own scope), so the
    written model holds initializers of one name in two subgraphs; ONNX Runtime 1.31 loads that,
    1.30 refuses it ("initializer name is not unique"). A renamed copy (name + its branch's
    path) loads in both; the external data stays where it is (only names change).

    ONNX Runtime 1.30 also writes some of a branch's initializers twice in that one branch, as
    byte-identical entries (seen: 160 of the bundled Marian decoder's, after the alignment
    edit): the second copy of each is dropped. Two entries of one name in one graph that
    differ could not be told apart by the nodes that read them; that raises."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    seen: dict[str, int] = {}
    changed = False

    def count(graph):
        nonlocal changed
        kept: dict[str, bytes] = {}
        duplicates = []
        for index, tensor in enumerate(graph.initializer):
            data = tensor.SerializeToString()
            if tensor.name not in kept:
                kept[tensor.name] = data
            elif kept[tensor.name] == data:
                duplicates.append(index)
            else:
                raise ValueError(f"{path}: two different initializers named {tensor.name!r} in graph {graph.name!r}")
        for index in reversed(duplicates):
            del graph.initializer[index]
        changed = changed or bool(duplicates)
        for name in kept:
            seen[name] = seen.get(name, 0) + 1
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    count(attr.g)

    def defined_in(graph) -> set[str]:
        return {v.name for v in graph.input} | {t.name for t in graph.initializer} | {
            o for n in graph.node for o in n.output}

    def rename_uses(graph, renamed):
        for node in graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    # a nested graph that defines one of the names means its own there
                    shadowed = defined_in(attr.g)
                    inner = {k: v for k, v in renamed.items() if k not in shadowed}
                    if inner:
                        rename_uses(attr.g, inner)
        for output in graph.output:
            if output.name in renamed:
                # a branch output that is one of its initializers: an Identity keeps the name
                output_name = output.name
                graph.node.append(onnx.helper.make_node("Identity", [renamed[output_name]], [output_name]))

    def visit(graph, scope):
        for index, node in enumerate(graph.node):
            for attr in node.attribute:
                if attr.type != onnx.AttributeProto.GRAPH:
                    continue
                # the node's index keeps two unnamed sibling Ifs apart
                sub, sub_scope = attr.g, f"{scope}/{index}:{node.name or node.op_type}.{attr.name}"
                renamed = {t.name: f"{t.name}@{sub_scope}" for t in sub.initializer if seen[t.name] > 1}
                for tensor in sub.initializer:
                    tensor.name = renamed.get(tensor.name, tensor.name)
                if renamed:
                    rename_uses(sub, renamed)
                visit(sub, sub_scope)

    count(model.graph)
    if all(n == 1 for n in seen.values()):
        if changed:
            onnx.save(model, path)
        return
    visit(model.graph, "")
    onnx.save(model, path)


class PrepackProgram:
    """A one-off worker program: write, for every model of the store, the optimized graph and its
    prepacked weights to ``<directory>/<prefix>-<key>.onnx`` (+ ``.data``), then stand by."""

    def __init__(self, context, *, directory: str, prefix: str):
        settings = context.session_settings
        self.paths = {}
        for key, entry in context.catalog.items():
            path = os.path.join(directory, f"{prefix}-{key}.onnx")
            create_session(entry, context._segment.buffer, settings, save_prepacked_to=path)
            _rename_shared_subgraph_initializers(path)
            self.paths[key] = path

    def describe(self) -> dict:
        return {"prepacked_models": self.paths}

    def run(self, method, payload):
        raise ValueError("the prepacking worker runs no batches")
