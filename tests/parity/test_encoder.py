"""Encoder.forward_batch against transformers on a random-init BERT exported by optimum-cli
(``--task feature-extraction``): last_hidden_state and the pooler output."""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest
import torch

import shmengine


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i + 4 for i in range(40)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)).eval()
    model.save_pretrained(root / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(root / "hf")
    subprocess.run(["optimum-cli", "export", "onnx", "--model", str(root / "hf"), "--task", "feature-extraction",
                    str(root / "onnx")], check=True, capture_output=True)
    return model, root / "onnx"


def test_forward_batch_equals_transformers(bert):
    model, path = bert
    batch = [["[CLS]", "w1", "w7", "w3", "[SEP]"], ["[CLS]", "w20", "[SEP]"], ["[CLS]", "w5", "w5", "w9", "w11", "w2", "[SEP]"]]
    with shmengine.Encoder(path, inter_threads=2, intra_threads=1) as encoder:
        out = encoder.forward_batch(batch)
        ids_out = encoder.forward_batch(np.array([[2, 5, 11, 7, 3, 0, 0]]), lengths=[5])
    assert out.last_hidden_state.shape == (3, 7, 32)
    has_pooler = "pooler_output" in {o.name for o in onnx.load(str(path / "model.onnx"), load_external_data=False).graph.output}
    for i, tokens in enumerate(batch):
        ids = torch.tensor([[encoder.vocabulary.token_to_id[t] for t in tokens]])
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        n = len(tokens)
        np.testing.assert_allclose(out.last_hidden_state[i, :n], ref.last_hidden_state[0].numpy(), atol=1e-4)
        # the graph's own pooler when the export has one, else the mean over the real tokens
        expected_pool = ref.pooler_output[0] if has_pooler else ref.last_hidden_state[0].mean(dim=0)
        np.testing.assert_allclose(out.pooler_output[i], expected_pool.numpy(), atol=1e-4)
    np.testing.assert_allclose(ids_out.last_hidden_state[0, :5], out.last_hidden_state[0, :5], atol=1e-4)


def _with_own_pooler(model, path, directory):
    """A copy of the export whose graph computes BERT's pooler itself (tanh(dense(first token))),
    with the weights of ``model.pooler``; the export's own graph is used when it has one."""
    from onnx import helper, numpy_helper

    directory.mkdir()
    for f in path.iterdir():
        if f.is_file() and f.name != "model.onnx":
            (directory / f.name).write_bytes(f.read_bytes())
    graph_model = onnx.load(str(path / "model.onnx"))
    graph = graph_model.graph
    if "pooler_output" not in {o.name for o in graph.output}:
        dense = model.pooler.dense
        graph.initializer.extend([
            numpy_helper.from_array(np.array(0, dtype=np.int64), "pool_index"),
            numpy_helper.from_array(dense.weight.detach().numpy().T.copy(), "pool_weight"),
            numpy_helper.from_array(dense.bias.detach().numpy().copy(), "pool_bias"),
        ])
        graph.node.extend([
            helper.make_node("Gather", ["last_hidden_state", "pool_index"], ["pool_first"], axis=1),
            helper.make_node("MatMul", ["pool_first", "pool_weight"], ["pool_mm"]),
            helper.make_node("Add", ["pool_mm", "pool_bias"], ["pool_pre"]),
            helper.make_node("Tanh", ["pool_pre"], ["pooler_output"]),
        ])
        graph.output.append(helper.make_tensor_value_info("pooler_output", onnx.TensorProto.FLOAT, ["batch_size", 32]))
    onnx.save(graph_model, str(directory / "model.onnx"))
    return directory


def test_a_graphs_own_pooler_is_returned_not_the_mean(bert, tmp_path):
    model, path = bert
    pooled = _with_own_pooler(model, path, tmp_path / "pooled")
    batch = [["[CLS]", "w1", "w7", "w3", "[SEP]"], ["[CLS]", "w20", "[SEP]"]]
    with shmengine.Encoder(pooled, inter_threads=1, intra_threads=1) as encoder:
        out = encoder.forward_batch(batch)
    for i, tokens in enumerate(batch):
        ids = torch.tensor([[encoder.vocabulary.token_to_id[t] for t in tokens]])
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        np.testing.assert_allclose(out.pooler_output[i], ref.pooler_output[0].numpy(), atol=1e-4)
        assert not np.allclose(out.pooler_output[i], ref.last_hidden_state[0].mean(dim=0).numpy(), atol=1e-3)


def test_asynchronous_forward_batch_and_clear_errors(bert):
    model, path = bert
    batch = [["[CLS]", "w1", "w7", "[SEP]"], ["[CLS]", "w5", "w9", "w11", "[SEP]"]]
    with shmengine.Encoder(path, inter_threads=2, intra_threads=1) as encoder:
        sync = encoder.forward_batch(batch)
        future = encoder.forward_batch(batch, asynchronous=True)
        assert hasattr(future, "result")
        got = future.result(timeout=60)
        np.testing.assert_allclose(got.last_hidden_state, sync.last_hidden_state, atol=1e-6)
        np.testing.assert_allclose(got.pooler_output, sync.pooler_output, atol=1e-6)
        # an unknown token is read as [UNK]
        unk = encoder.forward_batch([["[CLS]", "no-such-word", "[SEP]"], ["[CLS]", "[UNK]", "[SEP]"]])
        np.testing.assert_allclose(unk.last_hidden_state[0], unk.last_hidden_state[1], atol=1e-5)
        cases = [
            (lambda: encoder.forward_batch(np.array([[2, 5, 3]])), "without lengths"),
            (lambda: encoder.forward_batch([]), "empty batch"),
            (lambda: encoder.forward_batch([["[CLS]"], []]), r"inputs\[1\] is empty"),
            (lambda: encoder.forward_batch([["w1"] * 65]), "more than the model's 64 positions"),
        ]
        for call, message in cases:
            with pytest.raises(shmengine.InvalidInputError, match=message):
                call()
        np.testing.assert_allclose(encoder.forward_batch(batch).last_hidden_state, sync.last_hidden_state, atol=1e-6)
