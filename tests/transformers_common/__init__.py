"""transformers' common model tests (PyPI sdist of transformers 5.25.0, unmodified), with stand-ins
for the modules they import that the sdist lacks; README.md says which file is which."""
