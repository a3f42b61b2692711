"""Where bertode computes BERT's function (the discrete mode, Euler with one step) it keeps for
backward exactly the tensors HF BERT keeps: the same shapes in the same dtypes, one for one,
under CPU bf16 autocast and in fp32, with hidden and attention dropout on and padding.

The oracle is HF `BertForMaskedLM` (SDPA attention) measured in the same process with
`torch.autograd.graph.saved_tensors_hooks`. A surplus (an fp32 dropout mask under autocast,
an extra cast, a copy kept by the solver) shows up as a difference of the two multisets.
"""

from collections import Counter

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import bertode


def _saved(model, batch, precision: str) -> Counter:
    kept = Counter()

    def pack(tensor):
        kept[(tuple(tensor.shape), tensor.dtype)] += 1
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        loss = model(**batch).loss
    loss.backward()
    return kept


@pytest.fixture(scope="module")
def source_and_batch():
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    source = BertForMaskedLM._from_config(config, attn_implementation="sdpa").train()
    ids = torch.randint(3, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    return source, dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("overrides", [dict(mode="discrete"), dict(solver="euler", steps=1)],
                         ids=["discrete", "euler_1"])
def test_saved_tensors_equal_hf_bert_one_for_one(source_and_batch, overrides, precision):
    source, batch = source_and_batch
    model = bertode.from_bert(source, **overrides).train()
    reference, ours = _saved(source, batch, precision), _saved(model, batch, precision)
    assert sum(reference.values()) > 40  # the hooks saw the whole step
    assert ours == reference, f"surplus {dict(ours - reference)}, missing {dict(reference - ours)}"
