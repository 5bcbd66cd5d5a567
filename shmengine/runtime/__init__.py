"""Processes and memory: the pool, the fork server, workers, messages, placement and threads."""
