"""One CUDA stream per worker process, shared by every session the worker runs on its GPU.

By default each ONNX Runtime CUDA session makes its own compute stream and synchronises it at
the end of every ``Run``, so that the next session (another stream) sees finished outputs. A
decoding step is two runs back to back: the model, then a small helper graph (the top-k of the
last logits, a beam's Gather) that reads the model's outputs. With both sessions on one stream,
the model's run need not wait for the GPU: its outputs are ordered before the helper's kernels by
the stream itself, and the CPU prepares the helper's run while the GPU still computes the step.
The helper's run, whose results come to the host, synchronises as before.

The stream is made by cupy (the ``shmengine[cuda]`` extra) as a *blocking* stream, so copies
ONNX Runtime makes in the legacy default stream stay ordered with it.

It is opt-in (``SHMENGINE_CUDA_STREAM=shared``): measured on an H200 (``tools/bench_gpu.py
--sections strategies``, GPT-2-124M, 1 worker, interleaved medians of 9 rounds, tok/s shared /
own): greedy batch 1 193 / 181, batch 8 1411 / 1741, batch 32 5447 / 6613; beam 4 batch 8
1362 / 1489, batch 32 5329 / 4749. A second run had the same pattern: the shared stream wins at
batch 1 and for beam 4 at batch 32, loses at batch 8 and for greedy at 32. So by default each
session keeps its own stream and every run synchronises, as ONNX Runtime does.
Only worker processes call this: CUDA is never initialised in the supervisor or the fork server.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["shared_stream_options", "stream_is_shared", "with_shared_stream"]

_stream = None  # this process's stream, made on first use


def stream_is_shared() -> bool:
    """Whether this worker's CUDA sessions share one stream (and runs may skip their sync)."""
    if os.environ.get("SHMENGINE_CUDA_STREAM", "own") != "shared":
        return False
    return importlib.util.find_spec("cupy") is not None


def shared_stream_options() -> dict[str, str]:
    """The CUDA execution provider options that put a session on this worker's stream ({} when
    the stream is not shared)."""
    global _stream
    if not stream_is_shared():
        return {}
    if _stream is None:
        import cupy

        with cupy.cuda.Device(0):  # a CUDA worker sees only its own GPU, as device 0
            _stream = cupy.cuda.Stream(non_blocking=False)
    return {"user_compute_stream": str(_stream.ptr)}


def with_shared_stream(providers: list[str], provider_options: list[dict]) -> list[dict]:
    """``provider_options`` with the shared stream added to the CUDA provider's entry."""
    if "CUDAExecutionProvider" not in providers:
        return provider_options
    extra = shared_stream_options()
    return [dict(o, **extra) if p == "CUDAExecutionProvider" else o for p, o in zip(providers, provider_options)]
