"""The trigger form (Airflow Params) and the config: which settings the form shows, each field's
JSON schema taken from its config field (type, bounds, description), and a run's config from a
submitted form. Airflow itself is not imported here: the DAG builds its `Param`s from these schemas.
"""

from __future__ import annotations

from typing import Any

from ml.config import SECTIONS, PipelineConfig, available_profiles, load_config, local_path, resolve_path
from ml.errors import ConfigError

# The form's fields: form name -> config field.
PARAM_PATHS: dict[str, str] = {
    "dataset": "data.source",
    "dataset_split": "data.split",
    "base_model": "model.base_model",
    "learning_rate": "train.learning_rate",
    "max_steps": "train.max_steps",
    "num_train_epochs": "train.num_train_epochs",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "min_delta": "registry.min_delta",
    "approval": "registry.approval",
}
_SCHEMA_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "not", "enum", "description")
# Airflow's number field clamps a typed value into the schema's top-level minimum/maximum when it loses
# focus, without a word (-1 became 0): the bounds go one level down, where the server still refuses
# them on trigger (the form shows the refusal) and the field leaves the value as typed.
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "not")


def field_schema(dotted: str) -> dict[str, Any]:
    """JSON schema of one config field (`train.learning_rate`): type, bounds, description."""
    section, _, name = dotted.partition(".")
    model = SECTIONS.get(section) if name else PipelineConfig
    properties = model.model_json_schema()["properties"] if model else {}
    if (name or section) not in properties:
        raise ConfigError(f"no config field {dotted!r}")
    return {k: v for k, v in properties[name or section].items() if k in _SCHEMA_KEYS}


def param_schemas() -> dict[str, dict[str, Any]]:
    """Each form field's JSON schema from its config field. Nullable, because an empty field keeps
    the profile's value; the bounds apply to a value that is given. The description ends with the
    value an empty field runs, per profile."""
    out = {}
    profiles = {name: load_config(name).flat() for name in available_profiles()}
    for param, dotted in PARAM_PATHS.items():
        schema = field_schema(dotted)
        bounds = {k: schema.pop(k) for k in _BOUNDS if k in schema}
        out[param] = {**schema, "type": ["null", schema["type"]],
                      "description": f"{schema['description']} {_empty_runs(dotted, profiles)}"}
        if bounds:
            out[param]["allOf"] = [bounds]
        if "enum" in schema:  # an empty field is a choice too
            out[param]["enum"] = [None, *schema["enum"]]
    return out


def _empty_runs(dotted: str, profiles: dict[str, dict[str, Any]]) -> str:
    """'Empty: the profile's value (demo `30` · ...)': what a field left empty trains with, from each
    profile's `PipelineConfig.flat()`."""
    values = {name: flat[dotted] for name, flat in profiles.items()}
    if len({repr(v) for v in values.values()}) == 1:
        return f"Empty: the profile's value, `{next(iter(values.values()))}` in every profile."
    return "Empty: the profile's value (" + " · ".join(f"{n} `{v}`" for n, v in values.items()) + ")."



def config_from_params(params: dict[str, Any]) -> PipelineConfig:
    """A submitted form -> the run's config. A None/empty field means "keep the profile's value". The
    `deploy` settings stay the default profile's, which the DAG was parsed with, whatever the form's
    profile says."""
    overrides = {PARAM_PATHS[k]: v for k, v in params.items()
                 if k in PARAM_PATHS and v not in (None, "")}
    profile = params.get("profile") or None
    if profile is not None and profile not in available_profiles():  # a name, never a path to some file
        raise ConfigError(f"unknown profile {profile!r}: a run takes one of {', '.join(available_profiles())}")
    cfg = load_config(profile, overrides)
    cfg = cfg.model_copy(update={"deploy": load_config().deploy})
    roots = [resolve_path(r).resolve() for r in cfg.form_roots]
    for param in ("dataset", "base_model"):
        value = params.get(param)
        local = local_path(value) if value else None  # against the project root, whatever the working directory
        if local is not None and not any(local.resolve().is_relative_to(root) for root in roots):
            raise ConfigError(f"{param} {value!r} is outside the folders the trigger form may read "
                              f"({', '.join(cfg.form_roots)}: form_roots)")
    return cfg
