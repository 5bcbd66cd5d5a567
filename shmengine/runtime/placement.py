"""Where each worker runs: device, execution providers and threads, decided in the supervisor.

One worker per ``inter_threads`` on CPU; on CUDA, ``inter_threads`` workers per GPU listed in
``device_index`` (CTranslate2's meaning). Each worker is a process with its own CUDA context and
stream; CUDA is never initialised in the supervisor or the fork server, so forking stays safe.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shmengine.runtime.sessions import SessionSettings
from shmengine.runtime.target import RUNNER_KINDS, WorkerTarget
from shmengine.runtime.threads import ThreadPlan, get_cuda_device_count, plan_threads

__all__ = ["Placement", "place_workers", "check_placement_arguments", "DEVICES"]

DEVICES = ("cpu", "cuda", "auto")


class Placement:
    """The resolved device and one SessionSettings per worker slot."""

    def __init__(self, device: str, device_indices: list[int], plan: ThreadPlan, slots: list[SessionSettings],
                 runner: str = "host"):
        self.device = device
        self.runner = runner  # one of target.RUNNER_KINDS, the same in every slot
        self.device_indices = device_indices
        self.plan = plan
        self.slots = slots


def _cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and get_cuda_device_count() > 0


def check_placement_arguments(
    device, device_index, inter_threads, intra_threads, graph_optimization_level
) -> tuple[str, list[int]]:
    """The placement arguments checked on their own (no GPU probe): the device in lower case and
    the device indices as a list, or a ``ValueError`` saying what is wrong. The model classes
    run it through :class:`shmengine.api.model_options.ModelOptions`, before reading any file."""
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    if isinstance(inter_threads, bool) or not isinstance(inter_threads, int) or inter_threads < 1:
        raise ValueError(f"inter_threads must be an integer >= 1 (the number of parallel workers), got {inter_threads!r}")
    if isinstance(intra_threads, bool) or not isinstance(intra_threads, int) or intra_threads < 0:
        raise ValueError(f"intra_threads must be an integer >= 0 (0 = automatic), got {intra_threads!r}")
    if graph_optimization_level not in ("disable", "basic", "extended", "all"):
        raise ValueError(f"graph_optimization_level must be 'disable', 'basic', 'extended' or 'all', got {graph_optimization_level!r}")
    indices = [device_index] if isinstance(device_index, int) else list(device_index)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(f"device_index must be a non-negative int or a non-empty list of them, got {device_index!r}")
    if device.lower() == "cpu" and indices != [0]:
        raise ValueError(f"device_index={device_index!r} only has a meaning with device='cuda'")
    return device.lower(), indices


def place_workers(
    device: str = "cpu",
    device_index: int | Sequence[int] = 0,
    *,
    inter_threads: int = 1,
    intra_threads: int = 0,
    prepack_weights: bool = False,
    graph_optimization_level: str = "all",
) -> Placement:
    """Decide every worker's session settings, checking what depends on this machine.

    Raises ``ValueError`` with what to change for a missing GPU or a device index that does not
    exist, after :func:`check_placement_arguments` (the checks that need no machine); this runs
    before any process starts.
    """
    device, indices = check_placement_arguments(
        device, device_index, inter_threads, intra_threads, graph_optimization_level
    )
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    if device == "cuda":
        count = get_cuda_device_count()
        if count == 0 or not _cuda_available():
            raise ValueError(
                "device='cuda' was asked for, but no CUDA device is usable here "
                f"(CUDA devices: {count}; ONNX Runtime providers: {_providers()}). "
                "Install onnxruntime-gpu and a CUDA driver, or use device='cpu'."
            )
        missing = [i for i in indices if i >= count]
        if missing:
            raise ValueError(f"device_index {missing} does not exist: this machine has {count} CUDA device(s)")
    elif indices != [0]:
        raise ValueError(f"device_index={device_index!r} only has a meaning with device='cuda'")

    # A GPU keeps its tensors bound on the device; SHMENGINE_RUNNER=bound runs that path's code
    # on CPU OrtValues (tests, benchmarks).
    runner = os.environ.get("SHMENGINE_RUNNER", "host").strip().lower() or "host"
    if runner not in RUNNER_KINDS:
        raise ValueError(f"SHMENGINE_RUNNER must be one of {', '.join(RUNNER_KINDS)}, got {runner!r}")
    if device == "cuda":
        runner = "bound"
    workers = inter_threads * len(indices)
    if device == "cuda" and intra_threads == 0:
        # A CUDA worker's CPU nodes are shape ops and copies: an intra-op pool only adds thread
        # wake-ups to every step, so "automatic" means one thread there.
        intra_threads = 1
    plan = plan_threads(workers, intra_threads)
    slots = []
    for index in indices:
        for _ in range(inter_threads):
            # the worker sees only its own GPU (CUDA_VISIBLE_DEVICES, see cuda_visible_devices), as device 0
            providers = session_providers(device, 0)
            slots.append(
                SessionSettings(
                    intra_threads=plan.intra_threads,
                    allow_spinning=plan.allow_spinning,
                    prepack_weights=prepack_weights,
                    providers=providers,
                    graph_optimization_level=graph_optimization_level,
                    target=WorkerTarget(device=device, device_index=index, runner=runner),
                )
            )
    return Placement(device, indices, plan, slots, runner)


def session_providers(device: str, device_id: int) -> tuple[tuple[str, dict], ...]:
    """ONNX Runtime's providers (name, options) for a session on ``device``: the CUDA provider on
    GPU ``device_id`` with the CPU provider for the nodes it leaves, or the CPU provider alone."""
    if device == "cuda":
        return (("CUDAExecutionProvider", {"device_id": str(device_id)}), ("CPUExecutionProvider", {}))
    return (("CPUExecutionProvider", {}),)


def cuda_visible_devices(device_index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of a worker on ``device_index`` (an index among the devices
    this process sees): that one device only, so the worker's CUDA context, and that of every
    library it loads, can only be made there. An existing mask is honoured: with
    ``CUDA_VISIBLE_DEVICES=2,3`` index 1 is device 3."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None or not mask.strip():
        return str(device_index)
    entries = [entry.strip() for entry in mask.split(",") if entry.strip()]
    return entries[device_index] if device_index < len(entries) else str(device_index)


def _providers() -> str:
    import onnxruntime

    return ", ".join(onnxruntime.get_available_providers())
