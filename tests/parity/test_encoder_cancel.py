"""Encoder.forward_batch(asynchronous=True): its future is cancellable while the batch is queued
(the batch then never runs), and it never hangs."""

from __future__ import annotations

import shmengine

from .test_encoder import bert  # noqa: F401  (the fixture)


def test_async_forward_is_cancellable_while_queued(bert):  # noqa: F811
    model, path = bert
    with shmengine.Encoder(path, inter_threads=1, intra_threads=1) as encoder:
        busy = [encoder.forward_batch([["[CLS]", "w1", "w2", "[SEP]"]] * 256, asynchronous=True) for _ in range(40)]
        queued = encoder.forward_batch([["[CLS]", "w3", "[SEP]"]], asynchronous=True)
        assert queued.cancel() is True
        for f in busy:
            assert f.result(timeout=120).last_hidden_state.shape[0] == 256
        assert queued.cancelled()
        # the engine serves on
        assert encoder.forward_batch([["[CLS]", "w3", "[SEP]"]]).last_hidden_state.shape[0] == 1
