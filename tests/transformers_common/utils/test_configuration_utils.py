"""Stand-in for transformers' tests/utils/test_configuration_utils.py, which the PyPI sdist lacks and
test_configuration_common.py imports for ``config_common_kwargs``: every field that
`transformers.PreTrainedConfig` 5.25.0 declares (its dataclass fields, plus ``output_attentions``),
each set to a value other than its default, for ``ConfigTester.check_config_arguments_init``."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
