"""Every BertODE model class names HF's inspection flags in its ``forward`` (as HF BERT's
classes do, which transformers' common tests and `GenerationMixin` read by signature), and
each head passes them on to its base model."""

import inspect

import pytest
import torch
from transformers import PreTrainedModel

import bertode
from conftest import TINY, tiny_ode_config

CLASSES = [getattr(bertode, name) for name in bertode.__all__
           if inspect.isclass(getattr(bertode, name)) and issubclass(getattr(bertode, name), PreTrainedModel)
           and name != "BertODEPreTrainedModel"]


def test_every_model_class_is_listed():
    assert len(CLASSES) >= 9 and bertode.BertODEForCausalLM in CLASSES and bertode.BertODEForMultipleChoice in CLASSES


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_forward_names_output_attentions_and_output_hidden_states(cls):
    parameters = inspect.signature(cls.forward).parameters
    for name in ("output_attentions", "output_hidden_states", "return_dict"):
        assert name in parameters and parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (cls, name)
        assert parameters[name].default is None, (cls, name)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_each_head_returns_one_attention_map_and_every_hidden_state_when_asked(cls):
    torch.manual_seed(0)
    model = cls(tiny_ode_config(is_decoder=cls is bertode.BertODEForCausalLM, solver="euler", steps=1)).eval()
    ids = torch.randint(5, TINY["vocab_size"], (2, 2, 6) if cls is bertode.BertODEForMultipleChoice else (2, 6))
    out = model(ids, output_attentions=True, output_hidden_states=True)
    rows = ids.numel() // 6
    assert len(out.attentions) == TINY["num_hidden_layers"]
    assert all(a.shape == (rows, TINY["num_attention_heads"], 6, 6) for a in out.attentions)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert model(ids).attentions is None
