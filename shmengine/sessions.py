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

Weight *prepacking* (ORT re-lays MatMul weights for its kernels) makes a private copy per worker;
it is off unless ``prepack_weights=True`` is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sharedmem import SHM_DIR
from .weights import RAW_ONNX_TYPES, ModelEntry, storage_dtype

__all__ = ["SessionSettings", "create_session"]


@dataclass(frozen=True)
class SessionSettings:
    """How a worker configures each ONNX Runtime session (picklable: it travels to workers)."""

    intra_threads: int = 1
    allow_spinning: bool = False
    prepack_weights: bool = False
    providers: tuple[tuple[str, dict[str, Any]], ...] = (("CPUExecutionProvider", {}),)
    graph_optimization_level: str = "all"  # "disable" | "basic" | "extended" | "all"
    log_severity_level: int = 3  # ORT's own warnings are noise for users; errors still raise
    extra_config: dict[str, str] = field(default_factory=dict)


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def create_session(entry: ModelEntry, weights: memoryview, settings: SessionSettings):
    """An ``onnxruntime.InferenceSession`` for ``entry`` whose shared tensors live in ``weights``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_threads
    # One worker runs one graph at a time; parallelism across batches comes from more workers.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[settings.graph_optimization_level])
    options.log_severity_level = settings.log_severity_level
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    options.add_session_config_entry("session.disable_prepacking", "0" if settings.prepack_weights else "1")
    # The skeleton's external-data locations are relative to /dev/shm, where the segment lives.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", SHM_DIR)
    for key, value in settings.extra_config.items():
        options.add_session_config_entry(key, value)

    keep_alive = []
    for tensor in entry.tensors:
        dtype = storage_dtype(tensor.elem_type)
        array = np.frombuffer(weights, dtype=dtype, count=tensor.nbytes // dtype.itemsize, offset=tensor.offset)
        array = array.reshape(tensor.shape)
        if tensor.elem_type in RAW_ONNX_TYPES:
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, tensor.elem_type)
        else:
            value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(tensor.name, value)
        keep_alive.append(value)

    providers = [name for name, _ in settings.providers]
    provider_options = [opts for _, opts in settings.providers]
    session = ort.InferenceSession(entry.skeleton, options, providers=providers, provider_options=provider_options)
    session._shmengine_initializers = keep_alive  # see the module docstring: ORT does not hold them
    return session
