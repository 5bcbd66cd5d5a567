"""shmengine: ONNX models with CTranslate2's parallelism, built from processes.

A supervisor (your process) reads the model's weights once into shared memory; forked worker
processes run ONNX Runtime sessions over those pages, take batches from a bounded queue, and
hand back futures. See README.md for the architecture.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from shmengine.api.encoder import Encoder  # noqa: E402
from shmengine.api.engine import Engine  # noqa: E402
from shmengine.api.generator import Generator  # noqa: E402
from shmengine.api.options import set_random_seed  # noqa: E402
from shmengine.api.results import (  # noqa: E402
    AsyncGenerationResult,
    AsyncScoringResult,
    AsyncTranslationResult,
    EncoderForwardOutput,
    ExecutionStats,
    GenerationResult,
    GenerationStepResult,
    ScoringResult,
    TranslationResult,
)
from shmengine.api.translator import Translator  # noqa: E402
from shmengine.errors import (  # noqa: E402
    DeviceOutOfMemoryError,
    EngineBrokenError,
    EngineClosedError,
    InvalidInputError,
    ModelLoadError,
    ShmEngineError,
    TokenTypeError,
    WorkerCrashedError,
    WorkerStartupError,
)
from shmengine.runtime.mpi import MpiInfo  # noqa: E402
from shmengine.runtime.threads import get_cuda_device_count, parallel_info  # noqa: E402

logging.getLogger("shmengine").addHandler(logging.NullHandler())


def set_log_level(level: int) -> None:
    """Set the level of shmengine's log messages (CTranslate2's function; its levels are
    :mod:`logging`'s: ``logging.WARNING``, ``logging.INFO``, ...)."""
    logging.getLogger("shmengine").setLevel(level)


def get_log_level() -> int:
    """The level set by :func:`set_log_level` (``logging.NOTSET`` until one is set)."""
    return logging.getLogger("shmengine").level


def contains_model(path) -> bool:
    """Whether ``path`` is a model directory this engine can load (CTranslate2's name)."""
    from shmengine.errors import ModelLoadError
    from shmengine.model.modeldir import ModelDirectory

    for kind in ("seq2seq", "decoder", "encoder"):
        try:
            ModelDirectory.open(path, kind)
            return True
        except ModelLoadError:
            continue
    return False


def get_supported_compute_types(device: str, device_index: int = 0) -> set[str]:
    """The compute types this engine runs on ``device`` (``"cpu"`` or ``"cuda"``), as
    CTranslate2's function of that name answers: concrete types (``"default"`` and ``"auto"``
    are always accepted besides). Read from the registered model transforms (``transforms.py``);
    ``device_index`` is accepted for CTranslate2 compatibility (every GPU is taken to be alike)."""
    from shmengine.model.transforms import supported_compute_types

    return supported_compute_types(device)

__all__ = [
    "Engine",
    "Generator",
    "Translator",
    "Encoder",
    "MpiInfo",
    "contains_model",
    "get_supported_compute_types",
    "set_random_seed",
    "GenerationResult",
    "GenerationStepResult",
    "ScoringResult",
    "TranslationResult",
    "ExecutionStats",
    "EncoderForwardOutput",
    "ShmEngineError",
    "ModelLoadError",
    "InvalidInputError",
    "TokenTypeError",
    "AsyncTranslationResult",
    "AsyncGenerationResult",
    "AsyncScoringResult",
    "set_log_level",
    "get_log_level",
    "WorkerCrashedError",
    "WorkerStartupError",
    "EngineClosedError",
    "EngineBrokenError",
    "DeviceOutOfMemoryError",
    "parallel_info",
    "get_cuda_device_count",
    "__version__",
]
