"""Cancelling the per-example futures of a queued batch (concurrent.futures semantics): cancel()
returns True while the batch waits, the batch never runs, and a running batch cannot be cancelled."""

from __future__ import annotations

from pathlib import Path

import shmengine

GPT2 = Path(__file__).resolve().parents[1] / "models" / "numbers-gpt2"


def test_cancelling_every_example_of_a_queued_batch_cancels_it_and_it_never_runs():
    with shmengine.Generator(GPT2, inter_threads=1, intra_threads=1) as generator:
        bos = generator.vocabulary.id_to_token[generator.model.bos_id]
        # one worker, busy with a long batch, so the next call's batch waits in the queue
        busy = generator.generate_batch([[bos, "7", "="]] * 64, max_length=24, asynchronous=True, sampling_topk=0)
        ran = []
        queued = generator.generate_batch(
            [[bos, "1", "="], [bos, "2", "="]], max_length=24, asynchronous=True, callback=lambda step: ran.append(step)
        )
        assert not busy[0].done()
        assert [f.cancel() for f in queued] == [True, True]
        assert all(f.cancelled() for f in queued)
        for f in busy:
            f.result(timeout=120)
        # the cancelled batch was skipped: the pool is idle and its callback never saw a token
        after = generator.generate_batch([[bos, "3", "="]], max_length=24, include_prompt_in_result=False)
        assert " ".join(after[0].sequences[0]) == "three"
        assert ran == []


def test_a_running_batch_cannot_be_cancelled_and_delivers_its_results():
    with shmengine.Generator(GPT2, inter_threads=1, intra_threads=1) as generator:
        bos = generator.vocabulary.id_to_token[generator.model.bos_id]
        futures = generator.generate_batch([[bos, "4", "2", "="]] * 32, max_length=24, asynchronous=True,
                                           include_prompt_in_result=False)
        # wait until the worker took it: a running future refuses cancel()
        while not (futures[0].running() or futures[0].done()):
            pass
        assert futures[0].cancel() is False
        assert " ".join(futures[0].result(timeout=120).sequences[0]) == "forty two"


def test_cancelling_some_examples_of_a_queued_batch_still_runs_the_others():
    with shmengine.Generator(GPT2, inter_threads=1, intra_threads=1) as generator:
        bos = generator.vocabulary.id_to_token[generator.model.bos_id]
        busy = generator.generate_batch([[bos, "7", "="]] * 64, max_length=24, asynchronous=True, sampling_topk=0)
        queued = generator.generate_batch(
            [[bos, "5", "="], [bos, "6", "="]], max_length=24, asynchronous=True, include_prompt_in_result=False
        )
        assert queued[0].cancel() is True
        assert " ".join(queued[1].result(timeout=120).sequences[0]) == "six"
        assert queued[0].cancelled()
        for f in busy:
            f.result(timeout=120)


def test_close_with_wait_finishes_every_submitted_batch_first():
    generator = shmengine.Generator(GPT2, inter_threads=1, intra_threads=1)
    bos = generator.vocabulary.id_to_token[generator.model.bos_id]
    futures = [
        f
        for number in ("12", "345", "6789")
        for f in generator.generate_batch([[bos, *number, "="]], max_length=24, asynchronous=True, include_prompt_in_result=False)
    ]
    generator.close(wait=True)
    assert generator.closed
    words = [" ".join(f.result(timeout=0).sequences[0]) for f in futures]
    assert words == ["twelve", "three hundred forty five", "six thousand seven hundred eighty nine"]


def test_close_with_wait_and_cancel_futures_cancels_the_queued_and_finishes_the_running():
    generator = shmengine.Generator(GPT2, inter_threads=1, intra_threads=1)
    bos = generator.vocabulary.id_to_token[generator.model.bos_id]
    running = generator.generate_batch([[bos, "4", "2", "="]] * 32, max_length=24, asynchronous=True,
                                       include_prompt_in_result=False)
    while not (running[0].running() or running[0].done()):
        pass
    queued = generator.generate_batch([[bos, "7", "="]], max_length=24, asynchronous=True)
    generator.close(wait=True, cancel_futures=True)
    assert " ".join(running[0].result(timeout=0).sequences[0]) == "forty two"
    assert queued[0].cancelled()


def test_close_with_wait_from_a_callback_refuses_instead_of_deadlocking():
    import numpy as np

    engine = shmengine.Engine(Path(__file__).resolve().parents[1] / "models" / "default", inter_threads=1, intra_threads=1)
    feeds = {"x": np.zeros((2, engine.inputs[0].shape[1]), dtype=np.float32)}
    futures = engine.run_batch([feeds] * 3, asynchronous=True)
    raised = []

    def close_from_callback(_future):
        try:
            engine.close(wait=True)
        except RuntimeError as exc:
            raised.append(exc)

    futures[0].add_done_callback(close_from_callback)
    for f in futures:
        f.result(timeout=60)  # the other batches still complete: nothing hangs
    assert raised and "callback" in str(raised[0])
    engine.close()

