"""Where one worker runs: the typed target that placement decides and every worker receives.

A program reads its :class:`WorkerTarget` to choose how tensors live between steps (its runner,
``runners.py``), never the execution-provider names: a CUDA worker keeps the KV cache on its
device, a CPU worker in host memory, a tensor-parallel worker its shard.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WorkerTarget", "RUNNER_KINDS"]

# "host": numpy tensors and session.run (the fastest on CPU); "bound": IOBinding with OrtValues
# that stay where the session computed them (what a GPU needs; on CPU it runs the same code over
# CPU OrtValues, which is how the test suite exercises the device path without a GPU).
RUNNER_KINDS = ("host", "bound")


@dataclass(frozen=True)
class WorkerTarget:
    """Device, device index, compute type and tensor-parallel rank of one worker (picklable)."""

    device: str = "cpu"  # "cpu" | "cuda"
    device_index: int = 0
    compute_type: str = "float32"
    rank: int = 0
    world_size: int = 1
    runner: str = "host"  # one of RUNNER_KINDS

    def __post_init__(self):
        if self.runner not in RUNNER_KINDS:
            raise ValueError(f"runner must be one of {RUNNER_KINDS}, got {self.runner!r}")

    @property
    def ort_device(self) -> str:
        """The device name ONNX Runtime's IOBinding and OrtValue calls take."""
        return "cuda" if self.device == "cuda" else "cpu"
