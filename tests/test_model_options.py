"""The constructor arguments are checked in one place (``api/model_options.py``): every model
class refuses the same bad argument with the same message, before it reads the model directory
or starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import live_children, shm_segments

import shmengine
from shmengine import ModelLoadError
from shmengine.api.model_options import ModelOptions

MODELS = Path(__file__).resolve().parents[1] / "models"
# Each class with a model directory it opens (the Encoder opens the GPT-2 directory's
# model.onnx as an encoder graph; it is refused before any graph is read).
CLASSES = {
    "Engine": (shmengine.Engine, MODELS / "default"),
    "Generator": (shmengine.Generator, MODELS / "numbers-gpt2"),
    "Translator": (shmengine.Translator, MODELS / "numbers-marian"),
    "Encoder": (shmengine.Encoder, MODELS / "numbers-gpt2"),
}

BAD = [
    ({"compute_type": "int4"}, r"invalid compute_type 'int4'; valid values: default, auto, float32, int8"),
    ({"inter_threads": 0}, r"inter_threads must be an integer >= 1 .*got 0"),
    ({"inter_threads": 1.5}, r"inter_threads must be an integer >= 1 .*got 1\.5"),
    ({"intra_threads": -1}, r"intra_threads must be an integer >= 0 .*got -1"),
    ({"device": "tpu"}, r"device must be one of 'cpu', 'cuda', 'auto', got 'tpu'"),
    ({"device_index": [0, 1]}, r"device_index=\[0, 1\] only has a meaning with device='cuda'"),
    ({"device_index": -1}, r"device_index must be a non-negative int or a non-empty list of them, got -1"),
    ({"graph_optimization_level": "max"}, r"graph_optimization_level must be .*got 'max'"),
    ({"max_queued_batches": -2}, r"max_queued_batches must be -1 \(unlimited\), 0 \(automatic\) or > 0, got -2"),
    ({"prepack_weights": "yes"}, r"prepack_weights must be True, False or None \(automatic\), got 'yes'"),
]


def _refusal(make, match, error=ValueError) -> str:
    segments, children = shm_segments(), set(live_children())
    with pytest.raises(error, match=match) as info:
        make().close()
    assert shm_segments() == segments and set(live_children()) == children, "work was done before the refusal"
    return str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"), BAD, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None
)
def test_every_class_refuses_a_bad_argument_with_the_same_message(kwargs, match):
    messages = {
        name: _refusal(lambda cls=cls, path=path: cls(path, **kwargs), match) for name, (cls, path) in CLASSES.items()
    }
    assert len(set(messages.values())) == 1, messages
    # and ModelOptions itself, which the classes share, says exactly that
    assert _refusal(lambda: ModelOptions(**kwargs), match) == messages["Engine"]


@pytest.mark.parametrize("name", ["Generator", "Translator", "Encoder"])
def test_arguments_are_checked_before_the_model_directory_is_read(name, tmp_path):
    cls, _ = CLASSES[name]
    missing = tmp_path / "no-such-model"
    _refusal(lambda: cls(missing, inter_threads=0), r"inter_threads must be an integer >= 1")
    # the same call with good arguments gets as far as the directory
    _refusal(lambda: cls(missing), r"no-such-model", ModelLoadError)


def test_tensor_parallel_where_it_is_not_built():
    # the Encoder takes CTranslate2's tensor_parallel argument and says it has no such path
    _refusal(
        lambda: shmengine.Encoder(CLASSES["Encoder"][1], tensor_parallel=True),
        r"tensor_parallel=True is built for Generator .* and Translator .*, not for this model class",
        NotImplementedError,
    )
    _refusal(
        lambda: shmengine.Generator(CLASSES["Generator"][1], tensor_parallel="yes"),
        r"tensor_parallel must be True or False",
    )


@pytest.mark.parametrize("name", ["Generator", "Translator"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"files": {"model.onnx": b""}}, r"files= .* is not supported: write the files into a directory"),
    ],
    ids=["files"],
)
def test_what_is_not_built_is_refused_not_ignored(name, kwargs, match):
    """CTranslate2 arguments with no implementation here are refused before anything starts,
    never silently run some other way (files= would read model_path)."""
    cls, path = CLASSES[name]
    _refusal(lambda: cls(path, **kwargs), match, error=NotImplementedError)
