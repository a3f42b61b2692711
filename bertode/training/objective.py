"""Training objectives, an axis like the others: ``objective=<name>`` in `bertode.train`,
one `Objective` class per name in a registry (``bertode.register_objective``), and the
name saved in the model's config (``BertODEConfig.objective``), where `bertode.evaluate`
and `bertode.finetune` read it.

An objective says what a packed row ``[CLS] t_1 ... t_{T-2} [SEP]`` becomes as
(inputs, labels) (`make_batch`), which positions' logits score which labels (`aligned`),
and whether attention is causal (`causal`, which also picks the head:
`BertODEForCausalLM` or `BertODEForMaskedLM`). The loss is the cross-entropy of the
aligned logits over every label that is not -100, per target token.

Built in:

* ``mlm`` (default): BERT's masked-language model. ``data.mlm_probability`` of the tokens
  that are not special are chosen; of those 80 % become [MASK], 10 % a random token,
  10 % stay (`mask_tokens`, `DataCollatorForLanguageModeling`'s rule); the chosen tokens
  are the targets.
* ``clm``: next-token prediction over causal attention; rows go in unchanged. The targets
  are exactly the text tokens t_1 ... t_{T-2}: t_1 is predicted from [CLS] alone (a packed
  row starts mid-document), [CLS] and [SEP] are never targets. The unigram baseline
  (`corpus.unigram_cross_entropy`) scores the same tokens.

A user objective (see docs/extending.md)::

    @bertode.register_objective("span")
    class SpanMasking(bertode.Objective):
        def make_batch(self, rows, generator): ...   # (inputs, labels)
"""

from __future__ import annotations

import torch

from ..causal_lm import BertODEForCausalLM
from ..modeling import BertODEForMaskedLM
from ..registry import Registry


class Objective:
    """How packed token rows become (inputs, labels), and how logits line up with labels.

    Constructed with the run's tokenizer and ``data.mlm_probability`` (``probability``).
    Subclasses implement `make_batch`; ``causal = True`` makes attention causal and
    scores position i's logits against label i + 1."""

    causal: bool = False
    registry_name: str = ""

    def __init__(self, tokenizer, probability: float = 0.15):
        self.tokenizer = tokenizer
        self.probability = probability

    @property
    def name(self) -> str:
        return self.registry_name

    @property
    def label(self) -> str:
        """How the command line prints the loss (``MLM loss``)."""
        return self.name.upper()

    @property
    def model_class(self):
        return BertODEForCausalLM if self.causal else BertODEForMaskedLM

    def make_batch(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of packed rows (batch, seq); labels are -100 where nothing is predicted.
        Draw every random number from ``generator`` (evaluation fixes it by seed)."""
        raise NotImplementedError(f"{type(self).__name__}.make_batch")

    def aligned(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the labels they predict: position i's against token i + 1 when causal
        (the shift `BertODEForCausalLM` applies to its own loss)."""
        return (logits[:, :-1], labels[:, 1:]) if self.causal else (logits, labels)

    def targets(self, labels: torch.Tensor) -> int:
        """How many tokens ``labels`` asks to predict."""
        return int(((labels[:, 1:] if self.causal else labels) != -100).sum())


OBJECTIVES = Registry("objective", "objective", base=Objective, decorator="bertode.register_objective")


def register_objective(name: str, *, default: bool = False):
    """``@bertode.register_objective("span")`` on an `Objective` subclass: ``objective=span``."""
    return OBJECTIVES.register(name, default=default)


def available_objectives() -> tuple[str, ...]:
    return OBJECTIVES.names()


def get_objective(name) -> type[Objective]:
    """The class registered as ``name`` (None: the default, ``mlm``); one line otherwise."""
    if name is None:
        name = OBJECTIVES.default
    if name not in OBJECTIVES:
        raise ValueError(
            f"objective={name!r} is invalid; allowed: {', '.join(map(repr, OBJECTIVES.names()))} (registered "
            "objectives; a plugin's with plugins=[module])")
    return OBJECTIVES[name]


def make_objective(name, tokenizer, probability: float = 0.15) -> Objective:
    return get_objective(name)(tokenizer, probability)


def check_objective(value) -> str:
    """The registered name ``value`` stands for (None: the default); one line otherwise."""
    return get_objective(value).registry_name


def objective_of(saved: dict) -> str:
    """The objective a saved model's config.json names; for a model bertode did not train
    (no ``objective``), the built-in one of its attention (causal: next token)."""
    if saved.get("objective"):
        return saved["objective"]
    return CausalLanguageModel.registry_name if saved.get("is_decoder") else OBJECTIVES.default


def mask_tokens(rows: torch.Tensor, tokenizer, probability: float, generator: torch.Generator):
    """BERT's MLM corruption: choose ``probability`` of the tokens that are not special
    ([CLS], [SEP], [PAD], [UNK], [MASK]); of those,
    80 % become [MASK], 10 % a random token, 10 % stay. Labels are -100 elsewhere."""
    labels = rows.clone()
    special = torch.isin(rows, torch.tensor(tokenizer.all_special_ids, dtype=rows.dtype))  # as HF's collator
    chosen = (torch.rand(rows.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = rows.clone()
    draw = torch.rand(rows.shape, generator=generator)
    inputs[chosen & (draw < 0.8)] = tokenizer.mask_token_id
    randomise = chosen & (draw >= 0.8) & (draw < 0.9)
    inputs[randomise] = torch.randint(len(tokenizer), rows.shape, generator=generator)[randomise]
    return inputs, labels


@register_objective("mlm", default=True)
class MaskedLanguageModel(Objective):
    """BERT's masked LM: the chosen tokens (`mask_tokens`) are the targets."""

    def make_batch(self, rows, generator):
        return mask_tokens(rows, self.tokenizer, self.probability, generator)


@register_objective("clm")
class CausalLanguageModel(Objective):
    """Next token over causal attention: every text token is a target; [CLS] and [SEP] never."""

    causal = True

    def make_batch(self, rows, generator):
        labels = rows.clone()
        labels[:, 0] = labels[:, -1] = -100
        return rows.clone(), labels
