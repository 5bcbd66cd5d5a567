"""A beam step's top-k and log-normaliser over host logits, by a small ONNX Runtime graph.

Measured here (``tools/bench_beam_top.py``, 2 cores, one thread each, float32 [rows, V], k = 8):
numpy's blocked top-k (``decoding.top_k_ids``) plus its log-sum-exp take 30.7 ms at 128 x
58,101 (Marian-base, batch 32, beam 4), ORT's TopK and Exp/ReduceSum kernels 5.0 ms run over
blocks of 2 MiB of rows (7.9 ms in one run, whose arena then also kept 100+ MiB of
intermediates in every worker); 3.8 ms against 1.2 at 32 rows; 0.76 against 0.25 at 8 x 50,257.
For k = 1 numpy's argmax is as fast or faster, so greedy search keeps it. The graph is
``graph_edits.top_nodes``, the one a GPU's decoder runs in its own graph.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["top_k", "BLOCK_BYTES"]

BLOCK_BYTES = 2 << 20  # of logits per ORT run (tools/bench_beam_top.py)

_sessions: dict[bool, object] = {}
_lock = threading.Lock()  # tensor-parallel replicas decode in threads of one process


def _session(normalize: bool):
    session = _sessions.get(normalize)
    if session is None:
        with _lock:
            session = _sessions.get(normalize)
            if session is None:
                import onnxruntime as ort

                from shmengine.decode.runners import _top_graph

                options = ort.SessionOptions()
                # one thread: the worker's cores belong to its model session's pool
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                graph = _top_graph("tensor(float)", argmax=False, normalize=normalize, positions=False)
                session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
                _sessions[normalize] = session
    return session


def top_k(values: np.ndarray, k: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ``k`` largest of ``values`` [rows, V] float32 (sorted, the lower id first among
    equals), their ids, and the row's log-sum-exp [rows, 1] (zeros without ``normalize``);
    ``1 < k < V``."""
    logits = np.ascontiguousarray(values, dtype=np.float32)
    if not len(logits):
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, 1), np.float32)
    session = _session(normalize)
    feeds = {"k": np.array([k], dtype=np.int64)}
    # a block of rows per run: the arena then holds one block's intermediates (a whole
    # 128 x 58,101 step at once left 100+ MiB in every worker), and they stay in the cache
    step = max(1, BLOCK_BYTES // max(1, logits.shape[1] * 4))
    parts = []
    for start in range(0, len(logits), step):
        feeds["logits"] = logits[start : start + step]
        parts.append(session.run(None, feeds))
    top, ids = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    if not normalize:
        return top, ids, np.zeros((len(values), 1), np.float32)
    normalizer = np.concatenate([p[2] for p in parts])
    if not np.isfinite(normalizer).all():
        # a row of nothing but -inf (every token banned): numpy's normaliser says -inf, as
        # HostLogits always did, where max + log(sum(exp(x - max))) gives NaN
        from shmengine.decode.decoding import log_normalizer

        with np.errstate(divide="ignore"):  # log(0) is that row's answer
            normalizer = log_normalizer(logits)
    return top, ids, normalizer
