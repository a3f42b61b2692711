"""bertode: BERT whose Add & Norm residuals are ODEs solved by torchdyn, or a DEQ.

Public API:

* configuration and models: `BertODEConfig`, `BertODEModel`, `BertODEForMaskedLM`,
  `BertODEForSequenceClassification` and BERT's other heads (`heads.py`), `BertODEForCausalLM`
  (causal attention with ``is_decoder=True``, `generate()`; `causal_lm.py`),
  `BertODEPreTrainedModel`; `from_bert` (conversion from the BERT family: BERT, RoBERTa,
  XLM-R, CamemBERT, ELECTRA, ALBERT, DistilBERT); `compile_model`; `SolverStatsCallback` (Trainer logs).
* one registry per axis, each with a decorator and a listing (`available()` gives all):
  vector fields (`VectorField`, `register_vector_field`), ODE solvers
  (`register_solver`, `ButcherTableau`), sensitivity methods (`ODESensitivity`, `DEQSensitivity`,
  `register_sensitivity`; ``sensitivity=``), ODE-Transformer blocks (`Block`, `SchemeBlock`,
  `register_block`), fixed-point solvers (`register_fixed_point_solver`,
  `FixedPointTracker`), ODE regularisers (`Regularizer`, `register_regularizer`).
* training objectives (`Objective`, `register_objective`; ``mlm``, ``clm`` built in), saved
  with the model as ``BertODEConfig.objective``.
* the depth dial (`dialed`, `current_dial`), exit criteria (`ExitCriterion`,
  `register_exit_criterion`; ``exit=``) and the depth drawn per training step
  (`DepthDistribution`, `register_depth_distribution`; ``depth=``).
* initialisations that survive `post_init`: `zero_init`, `identity_init`.

Deprecated, for one release (each warns with a FutureWarning naming its replacement): the
sensitivity axis's former names `register_gradient`, `available_gradients`, `get_gradient`,
`ODEGradient`, `DEQGradient`.
"""

import warnings as _warnings

from .layers.blocks import Block, SchemeBlock, available_blocks, register_block
from .callbacks import SolverStatsCallback
from .causal_lm import BertODEForCausalLM
from .compile import compile_model
from .configuration import BertODEConfig
from .convert import from_bert
from .layers.init import identity_init, zero_init
from .heads import (
    BertODEForMultipleChoice,
    BertODEForNextSentencePrediction,
    BertODEForPreTraining,
    BertODEForQuestionAnswering,
    BertODEForSequenceClassification,
    BertODEForTokenClassification,
)
from .modeling import BertODEForMaskedLM, BertODEModel, BertODEPreTrainedModel
from .registry import registries
from .layers.regularizers import Regularizer, available_regularizers, register_regularizer
from .solve.deq_sensitivities import FixedPointProblem
from .solve.fixed_point import (
    DEQSolveError,
    FixedPointTracker,
    SolveInfo,
    available_fixed_point_solvers,
    get_fixed_point_solver,
    register_fixed_point_solver,
)
from .solve.sensitivities import (
    DEQSensitivity,
    ODESensitivity,
    available_sensitivities,
    get_sensitivity,
    register_sensitivity,
)
from .solve.dial import Dial, current_dial, dialed
from .solve.exits import ExitCriterion, available_exit_criteria, make_exit_criterion, register_exit_criterion
from .solve.ode import ODEProblem
from .solve.solvers import ButcherTableau, available_solvers, get_solver, register_solver
from .solve.stats import SolverStats
from .layers.vector_fields import VectorField, available_vector_fields, register_vector_field
from .training.depth import DepthDistribution, available_depth_distributions, register_depth_distribution
from .training.objective import Objective, available_objectives, register_objective

__version__ = "0.2.0"


def available() -> dict[str, tuple[str, ...]]:
    """Every registered name, by axis: what ``solver=``, ``sensitivity=``, ``block=``,
    ``vector_field=``, ``deq.solver=`` accept right now (your registrations included)."""
    return {field: registry.names() for field, registry in registries().items()}


# The sensitivity axis's former names (0.2): each still works for one release, with a FutureWarning.
_DEPRECATED = {"register_gradient": "register_sensitivity", "available_gradients": "available_sensitivities",
               "get_gradient": "get_sensitivity", "ODEGradient": "ODESensitivity", "DEQGradient": "DEQSensitivity"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        _warnings.warn(f"bertode.{name} is deprecated; use bertode.{new}", FutureWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BertODEConfig", "BertODEModel", "BertODEForMaskedLM", "BertODEForSequenceClassification",
    "BertODEForPreTraining", "BertODEForNextSentencePrediction", "BertODEForTokenClassification",
    "BertODEForQuestionAnswering", "BertODEForMultipleChoice", "BertODEForCausalLM",
    "BertODEPreTrainedModel", "from_bert", "compile_model", "SolverStatsCallback", "SolverStats", "available",
    "VectorField", "register_vector_field", "available_vector_fields",
    "ButcherTableau", "register_solver", "available_solvers", "get_solver", "ODEProblem",
    "ODESensitivity", "DEQSensitivity", "register_sensitivity", "available_sensitivities", "get_sensitivity",
    "FixedPointProblem",
    "Block", "SchemeBlock", "register_block", "available_blocks",
    "Regularizer", "register_regularizer", "available_regularizers",
    "register_fixed_point_solver", "available_fixed_point_solvers", "get_fixed_point_solver", "FixedPointTracker",
    "SolveInfo",
    "DEQSolveError", "zero_init", "identity_init", "Objective", "register_objective", "available_objectives",
    "Dial", "dialed", "current_dial", "ExitCriterion", "register_exit_criterion", "available_exit_criteria",
    "make_exit_criterion", "DepthDistribution", "register_depth_distribution", "available_depth_distributions",
]
