"""transformers' own common tests over every BertODE class: `ModelTesterMixin` and `ConfigTester`
(vendored, unmodified, from the transformers 5.25.0 PyPI sdist: tests/transformers_common/README.md),
in discrete mode and at Euler with one step (the mode where bertode equals BERT).

`BertODEModelTester` is transformers' `BertModelTester` (tests/models/bert/test_modeling_bert.py)
written for `BertODEConfig`: the same sizes and inputs. The test classes are `BertModelTest`'s, one per
mode, with `BertODEForCausalLM` in a class of its own (``is_decoder=True``). While they run, the
BertODE class names are in transformers' model-name mappings under ``bertode``, so that the mixin
gives each head its labels and runs its head-specific checks as it does for `BertFor*`.

transformers' generation tests (`GenerationTesterMixin`, tests/generation/test_utils.py) are not in
the sdist; the vendored folder's stand-in keeps test_modeling_common's import and its
``test_generation_tester_mixin_inheritance`` check. With ``BERTODE_TRANSFORMERS_TESTS`` set to a
folder holding transformers' ``tests/generation/test_utils.py`` (as ``generation/test_utils.py``), the
causal-LM classes run the real mixin too (docs/testing.md: which version, and how to run it).

A class's ``skipped`` maps a test name to the reason bertode skips it: of the real generation mixin's
tests, those of static caches (bertode refuses them in one line) and those that fail for HF's own
`BertLMHeadModel` as well (the mixin's version against transformers 5.25.0). The skips transformers'
tests make themselves are listed with their reasons in docs/testing.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import unittest
from unittest import mock

import pytest
import torch
from transformers.models.auto import modeling_auto

from bertode import (
    BertODEConfig,
    BertODEForCausalLM,
    BertODEForMaskedLM,
    BertODEForMultipleChoice,
    BertODEForNextSentencePrediction,
    BertODEForPreTraining,
    BertODEForQuestionAnswering,
    BertODEForSequenceClassification,
    BertODEForTokenClassification,
    BertODEModel,
)

pytest.importorskip("parameterized")  # test_modeling_common's own dependency (setup.cfg's test extra)

from transformers_common.generation.test_utils import GenerationTesterMixin  # noqa: E402
from transformers_common.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    ids_tensor,
    random_attention_mask,
)


MODES = {"discrete": dict(mode="discrete"), "euler1": dict(mode="ode", solver="euler", steps=1)}

# Each BertODE class under the mapping that names its HF BERT twin.
NAME_MAPPINGS = {
    "MODEL_MAPPING_NAMES": BertODEModel,
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": BertODEForMaskedLM,
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": BertODEForCausalLM,
    "MODEL_FOR_PRETRAINING_MAPPING_NAMES": BertODEForPreTraining,
    "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES": BertODEForNextSentencePrediction,
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": BertODEForSequenceClassification,
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": BertODEForTokenClassification,
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": BertODEForQuestionAnswering,
    "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES": BertODEForMultipleChoice,
}


def upstream_generation_mixin() -> tuple[type, ...]:
    """transformers' own `GenerationTesterMixin` from ``$BERTODE_TRANSFORMERS_TESTS/generation/test_utils.py``
    (loaded inside the vendored package, so its relative imports find the vendored test_modeling_common
    and its own generation folder), or nothing when the variable is unset."""
    root = os.environ.get("BERTODE_TRANSFORMERS_TESTS")
    if not root:
        return ()
    package = sys.modules["transformers_common.generation"]
    package.__path__.append(os.path.join(root, "generation"))
    name = "transformers_common.generation.upstream_test_utils"
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "generation", "test_utils.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return (module.GenerationTesterMixin,)


class BertODEModelTester:
    """transformers' `BertModelTester` for `BertODEConfig` (its sizes; dropout kept, as there)."""

    def __init__(self, parent, mode: dict, is_decoder: bool = False, batch_size=13, seq_length=7, vocab_size=99,
                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=512, type_vocab_size=16, num_labels=3, num_choices=4):
        self.parent, self.mode, self.is_decoder = parent, mode, is_decoder
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden_size, num_hidden_layers, num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.type_vocab_size, self.num_labels, self.num_choices = type_vocab_size, num_labels, num_choices
        self.is_training = True

    def get_config(self) -> BertODEConfig:
        return BertODEConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size, hidden_act="gelu",
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, initializer_range=0.02,
            is_decoder=self.is_decoder, **self.mode)

    def prepare_config_and_inputs_for_common(self):
        shape = [self.batch_size, self.seq_length]
        inputs = dict(input_ids=ids_tensor(shape, self.vocab_size), token_type_ids=ids_tensor(shape, self.type_vocab_size),
                      attention_mask=random_attention_mask(shape))
        return self.get_config(), inputs


class _BertODECommonTests(ModelTesterMixin):
    """`BertModelTest` over BertODE classes; a subclass picks the classes and the mode."""

    mode: dict
    is_decoder = False
    model_split_percents = [0.5, 0.8, 0.9]
    skipped: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, reason in cls.skipped.items():
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._names = [mock.patch.dict(getattr(modeling_auto, mapping), {"bertode": model.__name__})
                      for mapping, model in NAME_MAPPINGS.items()]
        for patch in cls._names:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in cls._names:
            patch.stop()
        super().tearDownClass()

    def setUp(self):
        self.model_tester = BertODEModelTester(self, self.mode, is_decoder=self.is_decoder)
        self.config_tester = ConfigTester(self, config_class=BertODEConfig, hidden_size=37)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """As `BertModelTest`'s: pre-training takes a next-sentence label beside the MLM labels."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is BertODEForPreTraining:
            inputs_dict["labels"] = torch.zeros((self.model_tester.batch_size, self.model_tester.seq_length),
                                                dtype=torch.long)
            inputs_dict["next_sentence_label"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict


ENCODER_CLASSES = (BertODEModel, BertODEForMaskedLM, BertODEForMultipleChoice, BertODEForNextSentencePrediction,
                   BertODEForPreTraining, BertODEForQuestionAnswering, BertODEForSequenceClassification,
                   BertODEForTokenClassification)


class TestBertODEDiscrete(_BertODECommonTests, unittest.TestCase):
    mode = MODES["discrete"]
    all_model_classes = ENCODER_CLASSES

    def test_config(self):
        self.config_tester.run_common_tests()


class TestBertODEEuler1(_BertODECommonTests, unittest.TestCase):
    mode = MODES["euler1"]
    all_model_classes = ENCODER_CLASSES


GENERATION_MIXINS = (*upstream_generation_mixin(), GenerationTesterMixin)

STATIC_CACHE = ("static caches (transformers: optional, `cache_implementation='static'`): bertode keeps one growing "
                "cache slot per attention evaluation, so a StaticCache sized for num_hidden_layers layers and a "
                "maximum length is refused in one line (kv_cache.refuse_fixed_length; tests/test_kv_cache.py)")
HF_PEER_FAILS = "fails for HF's own BertLMHeadModel under transformers 5.25.0 as well: "
# The real generation mixin's tests bertode skips, where the loaded mixin has them (its version decides which).
GENERATION_SKIPS = {
    "test_generate_with_static_cache": STATIC_CACHE,
    "test_generate_from_inputs_embeds_with_static_cache": STATIC_CACHE,
    "test_generate_compile_model_forward": STATIC_CACHE + "; and " + HF_PEER_FAILS
    + "generation_config.compile_config is None in v5",
    **dict.fromkeys(("test_constrained_beam_search_generate", "test_constrained_beam_search_generate_dict_output"),
                    HF_PEER_FAILS + "constrained beam search (PhrasalConstraint) was removed in transformers v5"),
    **dict.fromkeys(("test_contrastive_generate", "test_contrastive_generate_dict_outputs_use_cache",
                     "test_contrastive_generate_low_memory", "test_dola_decoding_sample",
                     "test_group_beam_search_generate", "test_group_beam_search_generate_dict_output"),
                    HF_PEER_FAILS + "contrastive search, DoLa and group beam search moved to the Hub in v5 "
                    "(trust_remote_code and a download)"),
    "test_generate_continue_from_past_key_values": HF_PEER_FAILS + "with the tester's random attention mask (holes "
    "mid-prompt) the continued call's last token differs; with an all-ones mask both pass",
}
CAUSAL_LM_SKIPS = {**_BertODECommonTests.skipped,
                   **{name: reason for name, reason in GENERATION_SKIPS.items() if hasattr(GENERATION_MIXINS[0], name)}}


class TestBertODECausalLMDiscrete(_BertODECommonTests, *GENERATION_MIXINS, unittest.TestCase):
    mode = MODES["discrete"]
    is_decoder = True
    all_model_classes = (BertODEForCausalLM,)
    skipped = CAUSAL_LM_SKIPS


class TestBertODECausalLMEuler1(_BertODECommonTests, *GENERATION_MIXINS, unittest.TestCase):
    mode = MODES["euler1"]
    is_decoder = True
    all_model_classes = (BertODEForCausalLM,)
    skipped = CAUSAL_LM_SKIPS
