"""Stand-in for transformers' tests/generation/test_utils.py, which the PyPI sdist lacks and
test_modeling_common.py imports: ``GenerationTesterMixin`` with no tests of its own.

test_modeling_common's ``test_generation_tester_mixin_inheritance`` checks that a test class
whose models can ``generate`` inherits this class. The real mixin (transformers' GitHub
sources only) is run by tests/test_transformers_common.py when ``BERTODE_TRANSFORMERS_TESTS``
names a folder holding it as ``generation/test_utils.py`` (docs/testing.md, "Generation tests")."""


class GenerationTesterMixin:
    """The generation tests' marker (see the module docstring)."""
