"""Oracle tests that kill the mutants of `bertode/layers/embeddings.py`, `bertode/convert.py` and
`bertode/families.py` (issue 29; docs/testing.md, "Mutation testing"): each variant of the embeddings
against its HF source or a sum written out here, the conversion tables' key sets, and the one-line refusals."""

import pytest
import torch
import transformers
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

import bertode
from bertode.convert import rename_key
from bertode.families import FAMILIES
from bertode.layers.embeddings import BertODEEmbeddings

SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40)


def _ids(rows=3, length=7, pad=1, seed=0):
    """Token ids above ``pad`` with padding at the end of the first row and in the middle of the last."""
    ids = torch.randint(pad + 1, SIZES["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(seed))
    ids[0, -2:] = pad
    ids[-1, 2] = pad
    return ids


def _roberta():
    torch.manual_seed(0)
    source = transformers.RobertaModel(transformers.RobertaConfig(**SIZES, pad_token_id=1, type_vocab_size=1))
    return source.double().eval(), bertode.from_bert(source, solver="euler", steps=1).double().eval()


def test_roberta_embeddings_equal_hf_from_ids_after_a_cache_and_from_inputs_embeds():
    """RoBERTa's numbering (HF's embeddings as the oracle, float64, 3 rows): from ids without ``past`` (its
    default is 0), after ``past`` cached tokens (HF's ``cache_length``), and from ``inputs_embeds``."""
    source, ours = _roberta()
    ids = _ids()
    assert (ours.embeddings(input_ids=ids) - source.embeddings(input_ids=ids)).abs().max() <= 1e-12
    for past in (1, 3):
        want = RobertaEmbeddings.create_position_ids_from_input_ids(ids, 1, past)
        assert torch.equal(ours.embeddings._positions(ids, ids.shape[1], past), want)
        got = ours.embeddings(input_ids=ids, past=past)
        assert (got - source.embeddings(input_ids=ids, cache_length=past)).abs().max() <= 1e-12
    embeds = source.embeddings.word_embeddings(ids)
    got = ours.embeddings(inputs_embeds=embeds)
    assert (got - source.embeddings(inputs_embeds=embeds)).abs().max() <= 1e-12
    # after `past` tokens without ids, every token is a real one: HF's rule for ids that hold no padding
    real = ids.clamp(min=2)
    for past in (0, 2):
        want = RobertaEmbeddings.create_position_ids_from_input_ids(real, 1, past)
        assert torch.equal(ours.embeddings._positions(None, ids.shape[1], past).expand_as(want), want)


def test_without_a_pad_token_roberta_numbering_takes_token_0_as_padding():
    config = bertode.BertODEConfig(**SIZES, position_scheme="after_padding", pad_token_id=None)
    ids = _ids(pad=0)
    want = RobertaEmbeddings.create_position_ids_from_input_ids(ids, 0)
    assert torch.equal(BertODEEmbeddings(config)._positions(ids, ids.shape[1], 0), want)


def test_given_position_ids_are_read_as_hf_reads_them():
    torch.manual_seed(0)
    source = transformers.BertModel(transformers.BertConfig(**SIZES)).double().eval()
    ours = bertode.from_bert(source).double().eval()
    ids, types = _ids(), torch.randint(0, 2, (3, 7), generator=torch.Generator().manual_seed(1))
    positions = torch.randint(0, SIZES["max_position_embeddings"], (3, 7), generator=torch.Generator().manual_seed(2))
    for given in (None, positions):
        got = ours.embeddings(input_ids=ids, token_type_ids=types, position_ids=given)
        assert (got - source.embeddings(input_ids=ids, token_type_ids=types, position_ids=given)).abs().max() <= 1e-12


def test_albert_with_embeddings_as_wide_as_the_layers_keeps_its_projection():
    """``embedding_projection=True`` (ALBERT's mapping) even where the widths agree; None: where they differ."""
    torch.manual_seed(0)
    source = transformers.AlbertModel(transformers.AlbertConfig(**SIZES, embedding_size=32)).double().eval()
    ours = bertode.from_bert(source, solver="euler", steps=1).double().eval()
    ids = _ids(pad=0)
    assert (ours(input_ids=ids).last_hidden_state - source(input_ids=ids).last_hidden_state).abs().max() <= 1e-10
    narrow = BertODEEmbeddings(bertode.BertODEConfig(**SIZES, embedding_size=16))
    assert narrow.project.weight.shape == (32, 16) and narrow(input_ids=ids).shape == (3, 7, 32)


def test_a_fresh_model_has_the_hf_model_s_state_dict_keys_and_shapes():
    """Untied, so ``cls.predictions.bias`` is a tensor of its own; ``position_ids`` is not saved (HF's neither)."""
    config = dict(SIZES, tie_word_embeddings=False)
    source = transformers.BertForMaskedLM(transformers.BertConfig(**config))
    ours = bertode.BertODEForMaskedLM(bertode.BertODEConfig(**config, mode="discrete"))
    want = {rename_key(key, FAMILIES["bert"]): tuple(value.shape) for key, value in source.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == want
    assert ours.cls.predictions.loss_kernel is None  # no sparse `scored` call yet: no kernel has run
