"""Each CUDA worker sees only its own GPU: the CUDA_VISIBLE_DEVICES it gets for a device index."""

from __future__ import annotations

import pytest

from shmengine.runtime.placement import cuda_visible_devices


@pytest.mark.parametrize(
    ("mask", "index", "expected"),
    [
        (None, 0, "0"),
        (None, 3, "3"),
        ("", 1, "1"),
        ("2,3", 0, "2"),
        ("2,3", 1, "3"),
        (" 5 , 7 ", 1, "7"),
        ("GPU-8a1f,GPU-77c2", 1, "GPU-77c2"),  # UUIDs pass through as the mask names them
    ],
)
def test_a_worker_sees_only_the_device_it_was_placed_on(monkeypatch, mask, index, expected):
    if mask is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    assert cuda_visible_devices(index) == expected
