"""Initialisations that survive `post_init`: the public way for a module of your own
(a vector field, a block) to keep a zero or identity start.

`transformers`' ``post_init`` re-initialises every ``nn.Linear`` of a model with BERT's
rule (normal, std ``initializer_range``; zero bias), also the ones inside a user's vector
field, and ``from_pretrained`` does the same for parameters a checkpoint lacks. Mark a
module with one of these helpers where you build it, and bertode's ``_init_weights``
applies that rule instead, at construction and for missing weights on load::

    self.proj = bertode.zero_init(nn.Linear(16, config.hidden_size))
    self.mix = bertode.identity_init(nn.Linear(config.hidden_size, config.hidden_size))

Each helper initialises the module now, records the rule on it, and returns it.
"""

from __future__ import annotations

from torch import nn
from transformers import initialization as hf_init

RULES = {
    "zeros": (hf_init.zeros_, hf_init.zeros_),
    "identity": (hf_init.eye_, hf_init.zeros_),
}


def _mark(module: nn.Module, rule: str) -> nn.Module:
    if not isinstance(module, nn.Module) or not hasattr(module, "weight"):
        raise TypeError(f"bertode.{rule}_init needs a module with a weight (e.g. nn.Linear), got {type(module).__name__}")
    module._bertode_init = rule
    apply_rule(module)
    return module


def zero_init(module: nn.Module) -> nn.Module:
    """Weight and bias zero, now and after ``post_init``/``from_pretrained``."""
    return _mark(module, "zeros")


def identity_init(module: nn.Module) -> nn.Module:
    """Weight the identity (square or rectangular eye), bias zero."""
    return _mark(module, "identity")


def apply_rule(module: nn.Module) -> bool:
    """Apply the module's recorded rule; False when it has none (used by ``_init_weights``)."""
    rule = getattr(module, "_bertode_init", None)
    if rule is None:
        return False
    if rule == "own":  # a module with parameters of its own kind (positions.TransformerXLPositions' u and v)
        module.reset_parameters()
        return True
    weight_rule, bias_rule = RULES[rule]
    weight_rule(module.weight)
    if getattr(module, "bias", None) is not None:
        bias_rule(module.bias)
    return True
