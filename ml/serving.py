"""The registered model: an MLflow pyfunc that answers questions with base model + LoRA adapter.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(df)` takes a
DataFrame with QUESTION (and optional CONTEXTS) and returns one answer per row.
The adapter and tokenizer travel as artifacts; a base model that is a local
folder (the demo's tiny model) travels too, a hub base model is referenced by
id and revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from ml.config import ModelConfig
from ml.data import QAExample
from ml.prompt import PromptFormat
from ml.signature import PYFUNC_PARAMS


class LoraQAModel(PythonModel):  # type: ignore[misc]
    # MLflow runs this file when a version is logged, to check it: the model stack is imported only
    # where a model is loaded, so that logging a version does not pay for it.
    def load_context(self, context: Any) -> None:
        from ml.modeling import load_with_adapter

        conf = dict(context.model_config or {})
        base = context.artifacts.get("base_model") or conf["base_model"]
        self.fmt = PromptFormat(**conf["prompt_format"])
        model_cfg = ModelConfig(base_model=base, revision=conf.get("revision"),
                                load_in_4bit=bool(conf.get("load_in_4bit", True)), dtype=conf.get("dtype", "auto"))
        self.model, self.tokenizer = load_with_adapter(model_cfg, Path(context.artifacts["adapter"]))

    # A DataFrame hint, from which MLflow infers no schema: ml/signature.py is the contract.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from ml.evaluate import generate_answers

        params = {**PYFUNC_PARAMS, **(params or {})}
        records = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else model_input
        examples = []
        for i, rec in enumerate(records):
            ctx = rec.get("CONTEXTS")
            if ctx is None or (isinstance(ctx, float)):  # missing -> NaN in a DataFrame
                ctx = []
            elif isinstance(ctx, str):
                ctx = [ctx]
            examples.append(QAExample(str(i), str(rec["QUESTION"]), tuple(str(c) for c in ctx), ""))
        return generate_answers(self.model, self.tokenizer, examples, self.fmt, int(params["max_new_tokens"]))


# Logged as "models from code": MLflow runs this file on load instead of unpickling an object.
set_model(LoraQAModel())
