"""bertode: BERT whose Add & Norm residuals are ODEs solved by torchdyn.

Public API: `BertODEConfig`, the models (`BertODEModel`, `BertODEForMaskedLM`,
`BertODEForSequenceClassification`), `from_bert` (conversion from any transformers
BERT), the vector-field registry (`VectorField`, `register_vector_field`) and
`compile_model` (torch.compile at the scope that gives whole graphs).
"""

from .compile import compile_model
from .configuration import BertODEConfig
from .convert import from_bert
from .modeling import (
    BertODEForMaskedLM,
    BertODEForSequenceClassification,
    BertODEModel,
    BertODEPreTrainedModel,
)
from .vector_fields import VectorField, available_vector_fields, register_vector_field

__version__ = "0.1.0"

__all__ = [
    "BertODEConfig",
    "BertODEModel",
    "BertODEForMaskedLM",
    "BertODEForSequenceClassification",
    "BertODEPreTrainedModel",
    "VectorField",
    "available_vector_fields",
    "compile_model",
    "from_bert",
    "register_vector_field",
]
