"""CTranslate2's constructor arguments, shared by Engine, Generator, Translator and Encoder.

Every model class takes the same ones (``device``, ``device_index``, ``compute_type``,
``inter_threads``, ``intra_threads``, ``max_queued_batches``, ``flash_attention``,
``tensor_parallel``, ``files``, and shmengine's ``prepack_weights`` and
``graph_optimization_level``). :class:`ModelOptions` holds them and checks them all when it is
made, before the model directory is read, a GPU probed or a process started, so the same bad
argument gets the same error from every class. What can only be decided on this machine (is a
GPU there, which compute type runs) is decided later, by placement and the model transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import InitVar, dataclass

from shmengine.model.transforms import check_compute_type
from shmengine.runtime.placement import check_placement_arguments
from shmengine.runtime.pool import resolve_queue_size

__all__ = ["ModelOptions"]


@dataclass(frozen=True)
class ModelOptions:
    """The constructor arguments of a model class, checked (``ValueError`` naming the argument,
    what it must be and what it got; ``NotImplementedError`` for ``tensor_parallel=True`` on a
    class that has no tensor-parallel path). Meanings: see :class:`shmengine.Engine`."""

    device: str = "cpu"
    device_index: int | Sequence[int] = 0
    compute_type: str = "default"
    inter_threads: int = 1
    intra_threads: int = 0
    max_queued_batches: int = 0
    prepack_weights: bool | None = None
    graph_optimization_level: str = "all"
    flash_attention: bool = False  # accepted for CTranslate2 compatibility (ORT picks its kernels)
    tensor_parallel: bool = False
    files: object = None  # CTranslate2's in-memory model files: refused (the model is read from model_path)
    # Whether the class being built has a tensor-parallel path (Generator, Translator).
    tensor_parallel_built: InitVar[bool] = False

    def __post_init__(self, tensor_parallel_built: bool) -> None:
        # compute_type first: a typo should not wait for a GPU probe or a model read
        check_compute_type(self.compute_type)
        check_placement_arguments(
            self.device, self.device_index, self.inter_threads, self.intra_threads, self.graph_optimization_level
        )
        resolve_queue_size(self.max_queued_batches, 1)
        if self.prepack_weights not in (None, True, False):
            raise ValueError(f"prepack_weights must be True, False or None (automatic), got {self.prepack_weights!r}")
        if self.tensor_parallel not in (True, False):
            raise ValueError(f"tensor_parallel must be True or False, got {self.tensor_parallel!r}")
        if self.files is not None:
            raise NotImplementedError(
                "files= (a model given as in-memory file contents) is not supported: write the files into a "
                "directory and pass its path as model_path"
            )
        if self.tensor_parallel and not tensor_parallel_built:
            raise NotImplementedError(
                "tensor_parallel=True is built for Generator (GPT-2, Llama) and Translator (Marian), not for this "
                "model class yet; run one model per process with inter_threads instead"
            )

    def pool_arguments(self) -> dict:
        """The arguments :class:`~shmengine.api.engine.PooledModel` places and starts workers with."""
        return {
            "device": self.device,
            "device_index": self.device_index,
            "compute_type": self.compute_type,
            "inter_threads": self.inter_threads,
            "intra_threads": self.intra_threads,
            "max_queued_batches": self.max_queued_batches,
            "prepack_weights": self.prepack_weights,
            "graph_optimization_level": self.graph_optimization_level,
        }
