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
