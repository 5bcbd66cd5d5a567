"""Decoding inside a worker: search, steppers over the exports, runners that keep tensors where they live, worker programs."""
