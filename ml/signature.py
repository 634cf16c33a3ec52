"""The registered model's interface: the input and output schema and the parameters MLflow records
with every version. Apart from the model itself (ml/serving.py), so that logging a version or
reading the registry does not import the model stack."""

from __future__ import annotations

from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

PYFUNC_PARAMS = {"max_new_tokens": 128}


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "QUESTION"),
                       ColSpec(Array(DataType.string), "CONTEXTS", required=False)]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec(k, DataType.long, v) for k, v in PYFUNC_PARAMS.items()]),
    )
