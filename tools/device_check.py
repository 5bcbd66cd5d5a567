"""Run on the GPU machine (see ../shared/device/README.md): CUDA workers over shared weights,
checked against numpy, and how throughput scales with workers on many CPU cores and on the GPU.

    python3 tools/device_check.py [--quick]

Prints one table at the end. Each row runs the engine and, where it applies, a baseline in the
same run: 1 worker is the baseline of N workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import shmengine  # noqa: E402
from models.builders import mlp_model, mlp_reference, save_model  # noqa: E402


def throughput(engine: shmengine.Engine, feeds: dict, batches: int) -> float:
    engine.run_batch([feeds] * engine.num_workers)  # warm-up on every worker
    start = time.perf_counter()
    for future in engine.run_batch([feeds] * batches, asynchronous=True):
        future.result()
    return batches / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = []
    print(shmengine.parallel_info(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, params = mlp_model([1024] * 9, seed=5)
        save_model(model, tmp, external_data=True)
        x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
        expected = mlp_reference(x.astype(np.float64), params)
        feeds = {"x": x}
        batches = 100 if args.quick else 400

        cores = len(os.sched_getaffinity(0))
        base = None
        for workers in [w for w in (1, 2, 4, 8, 16) if w <= cores]:
            with shmengine.Engine(tmp, inter_threads=workers, intra_threads=1, max_queued_batches=-1) as engine:
                rate = throughput(engine, feeds, batches)
            base = base or rate
            rows.append((f"cpu {workers} workers x 1 intra", f"{rate:.1f} batches/s", f"{rate / base:.2f}x of 1 worker"))
            print(rows[-1], flush=True)

        failures: list[str] = []
        if shmengine.get_cuda_device_count() > 0:
            gpu_base = None
            big = {"x": np.random.default_rng(1).standard_normal((2048, 1024)).astype(np.float32)}
            for workers in (1, 2):
                with shmengine.Engine(tmp, device="cuda", inter_threads=workers, max_queued_batches=-1) as engine:
                    out = engine.run_batch(feeds)["y"]
                    err = float(np.max(np.abs(out - expected)) / np.max(np.abs(expected)))
                    info = engine.parallel_info()
                    rate = throughput(engine, big, batches)
                gpu_base = gpu_base or rate
                on_cuda = info.count("CUDAExecutionProvider") >= workers
                rows.append(
                    (
                        f"cuda:0 {workers} workers (own context+stream each)",
                        f"{rate:.1f} batches/s of 2048 rows",
                        f"{rate / gpu_base:.2f}x; max rel err vs numpy {err:.1e}; providers cuda={on_cuda}",
                    )
                )
                print(rows[-1], flush=True)
                # TF32 matmuls (ORT's CUDA default) over 9 layers: ~1e-3 relative; 1e-2 is a wrong answer
                if err > 1e-2 or not on_cuda:
                    failures.append(f"cuda {workers} workers: max rel err {err:.1e}, on CUDA: {on_cuda}")
            ngpu = shmengine.get_cuda_device_count()
            if ngpu > 1:
                with shmengine.Engine(tmp, device="cuda", device_index=list(range(ngpu)), max_queued_batches=-1) as engine:
                    rate = throughput(engine, big, batches)
                rows.append((f"cuda 0..{ngpu - 1}, 1 worker per GPU", f"{rate:.1f} batches/s", f"{rate / gpu_base:.2f}x of 1 GPU"))
    print("\n" + "\n".join(f"{a:<45} {b:<30} {c}" for a, b, c in rows))
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
