"""`DataError`: bad data input (imported by every data module, so it lives on its own)."""


class DataError(ValueError):
    """Bad data input; the message names the config field and the offending value."""
