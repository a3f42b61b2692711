"""Nothing here is collected: the vendored files are mixins, run by tests/test_transformers_common.py."""

collect_ignore_glob = ["*.py"]
