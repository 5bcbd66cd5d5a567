"""One body of decoding tests, run against every registered runner (``runners.py``).

``RunnerContract`` holds the tests; each ``Test<Kind>Runner`` class below mixes it in for one
runner kind, so a new runner (a tensor-parallel one, say) gets the whole body by adding one
class. On this CPU machine the bound runner runs its device code path over CPU OrtValues: the
same IOBinding, device-side Gather and top-k graphs a CUDA worker runs (``tools/bench_gpu.py``
runs them on a GPU).

References are independent of shmengine: the held-out numbers in words
(``models/numbers_heldout.tsv``, written by ``number_to_words`` in models/train_numbers.py) and
numpy for the runner primitives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import shmengine
from shmengine.decode.decoding import HostLogits
from shmengine.decode.runners import HOST, KEEP, LOGITS, BoundRunner, HostRunner
from shmengine.runtime.target import RUNNER_KINDS, WorkerTarget

ROOT = Path(__file__).resolve().parents[1]
MARIAN = ROOT / "models" / "numbers-marian"
GPT2 = ROOT / "models" / "numbers-gpt2"


def heldout(count: int) -> list[tuple[str, str]]:
    with open(ROOT / "models" / "numbers_heldout.tsv", encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()][:count]


@pytest.fixture(scope="class")
def models(request):
    """A Generator and a Translator whose workers use this class's runner."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SHMENGINE_RUNNER", request.cls.runner_kind)
    try:
        with shmengine.Generator(GPT2, intra_threads=1) as generator, shmengine.Translator(MARIAN, intra_threads=1) as translator:
            yield generator, translator
    finally:
        patch.undo()


@pytest.mark.usefixtures("models")
class RunnerContract:
    # Beam searches use the exact stop rule: with CTranslate2's, these models miss ~8% of numbers
    # at beam 2+ (it stops on finished hypotheses while a live beam would still win; DESIGN.md).
    runner_kind: str

    def test_workers_use_this_runner(self, models):
        expected = {"host": "HostRunner", "bound": "BoundRunner"}[self.runner_kind]
        for model in models:
            assert model._pool.worker_info(0)["runner"] == expected
        # the bound runner's decoders compute the step's top-k in their own run; the host
        # runner's graphs are not given the extra outputs
        generator, translator = models
        assert ("step_top" in generator.transforms["model"]) == (self.runner_kind == "bound")
        assert ("step_top" in translator.transforms["decoder"]) == (self.runner_kind == "bound")
        # and the edit took: the graphs the workers load take the step's k
        for model, key in ((generator, "model"), (translator, "decoder")):
            inputs = {spec.name for spec in model._store.catalog[key].inputs}
            assert ("shmengine_top_k" in inputs) == (self.runner_kind == "bound"), sorted(inputs)

    @pytest.mark.parametrize("beam", [1, 4])
    def test_generator_writes_numbers(self, models, beam):
        generator = models[0]
        pairs = heldout(120)
        bos = generator.vocabulary.id_to_token[generator.model.bos_id]
        results = generator.generate_batch(
            [[bos, *n, "="] for n, _ in pairs], max_length=24, include_prompt_in_result=False, beam_size=beam,
            max_batch_size=40, early_stopping="never",
        )
        words = [" ".join(r.sequences[0]) for r in results]
        assert words == [w for _, w in pairs]

    @pytest.mark.parametrize("beam", [1, 4])
    def test_translator_writes_numbers(self, models, beam):
        translator = models[1]
        pairs = heldout(120)
        results = translator.translate_batch(
            [[*n, "</s>"] for n, _ in pairs], beam_size=beam, max_batch_size=40, early_stopping="never"
        )
        assert [" ".join(r.hypotheses[0]) for r in results] == [w for _, w in pairs]

    def test_scores_are_the_log_probabilities_of_the_right_words(self, models):
        generator, translator = models
        pairs = heldout(20)
        sources = [[*n, "</s>"] for n, _ in pairs]
        scored = translator.score_batch(sources, [w.split() for _, w in pairs])  # the end token is added
        wrong = translator.score_batch(sources, [w.split()[::-1] for _, w in pairs])
        for good, bad, (_, words) in zip(scored, wrong, pairs):
            assert len(good.log_probs) == len(words.split()) + 1
            assert all(lp <= 0 for lp in good.log_probs)
            assert sum(good.log_probs) > -0.5  # the model knows these numbers
            if len(words.split()) > 1 and words.split() != words.split()[::-1]:
                assert sum(bad.log_probs) < sum(good.log_probs) - 1

    def test_sampling_with_a_seed_repeats_and_another_seed_differs(self, models):
        generator = models[0]
        bos = generator.vocabulary.id_to_token[generator.model.bos_id]
        prompts = [[bos, "7", "="]] * 16

        def sample(seed):
            shmengine.set_random_seed(seed)
            results = generator.generate_batch(prompts, max_length=12, sampling_topk=0, sampling_temperature=3.0)
            return [r.sequences[0] for r in results]

        first, again, other = sample(11), sample(11), sample(12)
        assert first == again
        assert first != other

    def test_translator_samples_several_hypotheses_per_source(self, models):
        translator = models[1]
        pairs = heldout(12)
        shmengine.set_random_seed(5)
        results = translator.translate_batch(
            [[*n, "</s>"] for n, _ in pairs], beam_size=1, num_hypotheses=3, sampling_topk=5, sampling_temperature=0.05
        )
        for result, (_, words) in zip(results, pairs):
            # near-zero temperature: every sample is the model's answer, each of its own source
            assert [" ".join(h) for h in result.hypotheses] == [words] * 3

    def test_streaming_gives_the_greedy_tokens(self, models):
        generator = models[0]
        bos = generator.vocabulary.id_to_token[generator.model.bos_id]
        number, words = heldout(1)[0]
        streamed = [step.token for step in generator.generate_tokens([bos, *number, "="], max_length=24)]
        assert " ".join(t for t in streamed if t not in ("</s>", "<|endoftext|>", "<eos>")) == words


class TestHostRunner(RunnerContract):
    runner_kind = "host"


class TestBoundRunner(RunnerContract):
    runner_kind = "bound"


def test_every_runner_kind_has_a_test_class():
    classes = {cls.runner_kind for cls in RunnerContract.__subclasses__()}
    assert classes == set(RUNNER_KINDS)


# -- the bound runner's device-side primitives, against numpy ---------------------------------------


def _ortvalue(array):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


@pytest.fixture(scope="module")
def bound():
    return BoundRunner(WorkerTarget(runner="bound"), (("CPUExecutionProvider", {}),))


def test_gather_reorders_repeats_and_drops_rows_like_numpy(bound):
    rng = np.random.default_rng(0)
    cache = {
        "k": rng.standard_normal((5, 2, 3, 4)).astype(np.float32),
        "v": rng.standard_normal((5, 2, 3, 4)).astype(np.float16),
        "mask": rng.integers(0, 2, size=(5, 3)),
    }
    rows = np.array([4, 4, 0, 2])
    values = {name: (_ortvalue(a) if name != "mask" else a) for name, a in cache.items()}
    taken = bound.take(values, rows)
    assert list(taken) == list(cache)
    for name, array in cache.items():
        got = taken[name] if isinstance(taken[name], np.ndarray) else taken[name].numpy()
        np.testing.assert_array_equal(got, array[rows])


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_top_k_and_normaliser_match_numpy(bound, dtype, k):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((6, 3, 50)) * 4).astype(dtype)
    logits[2, -1, 7] = logits[2, -1, 9] = logits[2, -1].max() + 1  # a tie: the lower id first
    values, ids, normalizer = bound.top(_ortvalue(logits), k)
    last = logits[:, -1, :].astype(np.float32)
    expected_ids = np.argsort(-last, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(values, np.take_along_axis(last, expected_ids, axis=-1), rtol=1e-6)
    peak = last.max(axis=-1, keepdims=True)
    reference = peak + np.log(np.exp(last - peak).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(normalizer, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_top_without_the_normaliser_gives_the_same_top_k(bound, k):
    """normalize=False (greedy with no score asked): the same values and ids as with it, from
    the device graph and from numpy, and no normaliser (zeros)."""
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((5, 2, 40)) * 3).astype(np.float32)
    last = logits[:, -1, :]
    expected_ids = np.argsort(-last, axis=-1, kind="stable")[:, :k]
    for values, ids, normalizer in (bound.top(_ortvalue(logits), k, normalize=False),
                                    HostLogits(last).top(k, normalize=False)):
        order = np.argsort(-values, axis=-1, kind="stable")  # numpy's top-k comes in any order
        np.testing.assert_array_equal(np.take_along_axis(ids, order, axis=-1), expected_ids)
        np.testing.assert_allclose(np.take_along_axis(values, order, axis=-1),
                                   np.take_along_axis(last, expected_ids, axis=-1), rtol=1e-6)
        np.testing.assert_array_equal(normalizer, np.zeros((5, 1), np.float32))


def test_runners_run_a_session_the_same_way():
    """The same graph through both runners: HOST outputs as arrays, KEEP fed back, LOGITS reduced."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "past"], ["present"]), helper.make_node("Mul", ["present", "x"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 8]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, ["b", 1, 8])],
        [helper.make_tensor_value_info("present", TensorProto.FLOAT, ["b", 1, 8]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 1, 8)).astype(np.float32)
    past = np.zeros_like(x)
    for runner in (HostRunner(), BoundRunner(WorkerTarget(runner="bound"), (("CPUExecutionProvider", {}),))):
        state = past
        for _ in range(3):
            out = runner.run(session, {"x": x, "past": state}, {"present": KEEP, "logits": LOGITS})
            state = out["present"]
        full = runner.run(session, {"x": x, "past": state}, {"logits": HOST})["logits"]
        # numpy: present_n = n * x, logits = present * x
        np.testing.assert_allclose(full, (4 * x) * x, rtol=1e-6)
        values, ids, _ = out["logits"].top(1)
        np.testing.assert_array_equal(ids[:, 0], np.argmax((3 * x * x)[:, -1, :], axis=-1))


def test_bfloat16_logits_come_back_as_float32(bound):
    """numpy has no bfloat16: the bound runner casts where the tensor lies; numpy's reference is
    the float32 whose upper 16 bits are the bfloat16's."""
    import onnxruntime as ort
    from onnx import TensorProto

    from shmengine.decode.runners import BoundLogits

    x = np.random.default_rng(3).standard_normal((3, 2, 40)).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, TensorProto.BFLOAT16)
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(bound.to_host(value), expected)
    np.testing.assert_array_equal(BoundLogits(value, bound).array(), expected[:, -1, :])
    _, ids, _ = BoundLogits(value, bound).top(3)
    np.testing.assert_array_equal(ids, np.argsort(-expected[:, -1, :], axis=-1, kind="stable")[:, :3])


def test_a_graph_with_the_step_top_answers_the_search_from_its_own_run():
    """graph_edits.expose_step_top: the model's run brings the step's top-k and normaliser to
    the host, so the search needs no second (helper graph) run; a larger k falls back to the
    helper once and the next runs compute that k; rows taken keep their top-k. numpy is the
    reference."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from shmengine.model.graph_edits import STEP_TOP_K, expose_step_top

    vocab = 37
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.5])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", vocab])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])], [scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    assert expose_step_top(model)
    assert STEP_TOP_K in {i.name for i in model.graph.input}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runner = BoundRunner(WorkerTarget(runner="bound"), (("CPUExecutionProvider", {}),))
    rng = np.random.default_rng(3)

    def expected(x, k):
        last = (x * np.float32(1.5))[:, -1, :]
        ids = np.argsort(-last, axis=-1, kind="stable")[:, :k]
        peak = last.max(axis=-1, keepdims=True)
        return np.take_along_axis(last, ids, axis=-1), ids, peak + np.log(np.exp(last - peak).sum(-1, keepdims=True))

    def check(got, want):
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)

    def helper_runs():
        return [key for key in runner._helpers if key[0] == "top"]

    x = (rng.standard_normal((4, 3, vocab)) * 3).astype(np.float32)
    x[1, -1, 5] = x[1, -1, 20] = x[1, -1].max() + 1  # a tie: the lower id first, as numpy's stable sort
    logits = runner.run(session, {"x": x}, {"logits": LOGITS})["logits"]
    check(logits.top(1), expected(x, 1))
    assert helper_runs() == []  # answered from the model's own run

    check(logits.top(4), expected(x, 4))  # more than the run computed: the helper graph, once
    assert len(helper_runs()) == 1
    x = (rng.standard_normal((4, 1, vocab)) * 3).astype(np.float32)
    logits = runner.run(session, {"x": x}, {"logits": LOGITS})["logits"]
    check(logits.top(4), expected(x, 4))  # the model computed k = 4 this time
    assert len(helper_runs()) == 1
    rows = np.array([3, 3, 0])
    taken = logits.take(rows)
    check(taken.top(2), expected(x[rows], 2))
    np.testing.assert_allclose(taken.array(), (x * np.float32(1.5))[rows, -1, :], rtol=1e-6)
    assert len(helper_runs()) == 1


def test_the_step_top_edit_leaves_a_graph_it_cannot_serve_as_it_is():
    from onnx import TensorProto, helper

    from shmengine.model.graph_edits import expose_step_top

    def model(shape, opset=13):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["logits"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    for m in (model(["b", 9]), model(["b", "s", 9], opset=11)):  # logits of rank 2; ReduceSum axes need opset 13
        before = m.SerializeToString()
        assert not expose_step_top(m)
        assert m.SerializeToString() == before
