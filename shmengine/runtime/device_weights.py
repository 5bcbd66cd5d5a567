"""Weights once per GPU: one device copy of the shared segment, mapped by every worker on that GPU.

Measured on an H200 with ORT 1.31 (``tools/bench_gpu.py --sections share``, GPT-2-124M shape,
621 MiB of weights): a CUDA session whose initializers are given to
``SessionOptions.add_initializer`` as host OrtValues takes 700 MiB of device memory at
creation (ORT copies every weight to the device); given as OrtValues over device memory
(``OrtValue.from_dlpack`` of a cupy array), it takes 74 MiB: ORT uses them in place.

So, per GPU::

    supervisor ─ spawns ─▶ holder worker (DeviceWeightsProgram): cudaMalloc(segment size),
                           copies the segment's pages in, exports a CUDA IPC handle, stands by
    supervisor ◀─ handle ─ holder          (the handle travels in every slot's SessionSettings)
    CUDA worker ─ cudaIpcOpenMemHandle ─▶ the same device memory; each tensor a cupy view at its
                           offset ─▶ OrtValue.from_dlpack ─▶ add_initializer (no copy)

The holder is a process of its own, not one of the serving workers, so a serving worker that
crashes (and is respawned) never takes the weights with it; the holder lives as long as the
model. If the holder itself dies, its device memory is freed under every mapping of it (CUDA
calls using an IPC mapping after the exporter freed it undefined), so :class:`HolderWatch`
stops that GPU's serving workers at once, their batches go back to the queue, the holder's pool
starts a new holder (a new upload, a new handle), and the workers start again on the new handle.
If no holder can be started, the model breaks with the reason. CUDA is initialised only there and in the workers, never in the supervisor or the fork
server. cupy is the optional extra ``shmengine[cuda]``; without it every worker uploads its own
copy, as before, and the model says so in a log line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import threading
from dataclasses import dataclass

import numpy as np

from shmengine.errors import EngineBrokenError, describe_exit
from shmengine.model.weights import RAW_ONNX_TYPES, ModelEntry, storage_dtype
from shmengine.runtime.pool import PoolObserver

__all__ = ["DeviceWeights", "DeviceWeightsProgram", "HolderWatch", "device_initializers", "sharing_available"]

logger = logging.getLogger("shmengine")


@dataclass(frozen=True)
class DeviceWeights:
    """Where one GPU's copy of the segment is: an IPC handle to ``nbytes`` of device memory."""

    device_index: int  # as the user named it (each process sees its GPU as device 0)
    handle: bytes
    nbytes: int


def sharing_available() -> bool:
    """Whether cupy can be imported (checked without importing it: the supervisor stays CUDA-free)."""
    return importlib.util.find_spec("cupy") is not None


class DeviceWeightsProgram:
    """The holder worker of one GPU: uploads the segment once and exports it; runs no batches."""

    def __init__(self, context, *, device_index: int):
        import cupy

        buffer = context._segment.buffer
        nbytes = len(buffer)
        # Like every CUDA worker, the holder sees only its own GPU (CUDA_VISIBLE_DEVICES): device 0.
        with cupy.cuda.Device(0):
            # cupy.cuda.Memory is one cudaMalloc of its own (not a slice of cupy's memory pool),
            # so its IPC handle names exactly this allocation, offset 0.
            self._memory = cupy.cuda.Memory(nbytes)
            host = np.frombuffer(buffer, dtype=np.uint8)
            cupy.cuda.runtime.memcpy(self._memory.ptr, host.ctypes.data, nbytes, cupy.cuda.runtime.memcpyHostToDevice)
            cupy.cuda.runtime.deviceSynchronize()
            handle = cupy.cuda.runtime.ipcGetMemHandle(self._memory.ptr)
        self.weights = DeviceWeights(device_index, bytes(handle), nbytes)

    def describe(self) -> dict:
        return {"device_weights": self.weights}

    def run(self, method, payload):
        raise ValueError("the device-weights holder runs no batches")


class HolderWatch(PoolObserver):
    """Watches one GPU's holder (from its pool's manager thread) on behalf of the serving pool.

    ``slots`` maps each serving slot on this GPU to its session settings. The serving pool is
    attached once it exists (:meth:`attach`); it is reached only through its thread-safe
    ``hold_slots``, ``resume_slots`` and ``abort``. A holder that dies while the serving pool is
    still starting is remembered, and acted on when it is attached.

    Two limits: a batch whose result a worker sent between the holder's death and its own kill is
    delivered (the window is the fork server's report, milliseconds); and batches wait while the
    new holder uploads, with no deadline other than its start failing.
    """

    def __init__(self, device_index: int, slots: dict):
        self.device_index = device_index
        self.slots = dict(slots)
        self.serving = None
        self._lock = threading.Lock()
        self._lost: str | None = None  # why the serving slots' handle is stale, until they resume
        self._latest: DeviceWeights | None = None  # the newest holder's copy, once it is ready

    def attach(self, serving) -> None:
        with self._lock:
            self.serving = serving
            lost, latest = self._lost, self._latest
        if lost is not None:
            serving.hold_slots(self.slots, lost)
            if latest is not None:
                self._resume(latest)

    def worker_exited(self, slot: int, exitcode: int) -> None:
        reason = (f"the weight holder of GPU {self.device_index} {describe_exit(exitcode)}, and with it the "
                  "device copy of the weights this worker mapped; it restarts on a new copy")
        with self._lock:
            self._lost, self._latest = reason, None
            serving = self.serving
        if serving is not None:
            serving.hold_slots(self.slots, reason)

    def worker_ready(self, slot: int, info: dict, first: bool) -> None:
        if first:
            return  # the first holder's handle is already in the serving slots' settings
        with self._lock:
            self._latest = info["device_weights"]
            serving = self.serving
        if serving is not None:
            self._resume(self._latest)

    def _resume(self, weights: DeviceWeights) -> None:
        with self._lock:
            self._lost = None
        self.serving.resume_slots({s: dataclasses.replace(settings, device_weights=weights) for s, settings in self.slots.items()})

    def pool_broken(self, reason: BaseException) -> None:
        if self.serving is not None:
            error = EngineBrokenError(f"the weight holder of GPU {self.device_index} cannot be restarted: {reason}")
            error.__cause__ = reason
            self.serving.abort(error)


_opened: dict[bytes, object] = {}  # handle -> the worker's mapping, opened once per process


def _open(weights: DeviceWeights):
    import cupy

    pointer = _opened.get(weights.handle)
    if pointer is None:
        with cupy.cuda.Device(0):  # the worker's only visible GPU, the holder's too
            address = cupy.cuda.runtime.ipcOpenMemHandle(weights.handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess)
        memory = cupy.cuda.UnownedMemory(address, weights.nbytes, owner=None, device_id=0)
        pointer = cupy.cuda.MemoryPointer(memory, 0)
        _opened[weights.handle] = pointer
    return pointer


def device_initializers(entry: ModelEntry, weights: DeviceWeights) -> list[tuple[str, object, object]]:
    """(name, OrtValue, view) for every shared tensor of ``entry`` that can live on the device:
    views into the holder's device copy, no bytes moved. Tensors of types numpy cannot describe
    (bfloat16 and the like) are left out: the caller gives those as host values."""
    import cupy
    import onnxruntime as ort

    base = _open(weights)
    values = []
    with cupy.cuda.Device(0):
        for tensor in entry.tensors:
            if tensor.elem_type in RAW_ONNX_TYPES:
                continue
            dtype = storage_dtype(tensor.elem_type)
            view = cupy.ndarray(tuple(tensor.shape), dtype=dtype, memptr=base + tensor.offset)
            values.append((tensor.name, ort.OrtValue.from_dlpack(view), view))
    return values
