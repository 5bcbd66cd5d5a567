"""``shmengine-run``: the launcher, its tokenizer, thread tuning and data parallelism under ``mpirun``."""

from shmengine.cli.main import main

__all__ = ["main"]
