from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from ml.config import (
    DEFAULT_PROFILE,
    PROFILES_DIR,
    SECTIONS,
    PipelineConfig,
    load_config,
    parse_overrides,
    read_profile,
    role,
)
from ml.errors import ConfigError, DataError
from ml.params import PARAM_PATHS, config_from_params
from ml.prompt import PromptFormat
from ml.settings_reference import reference_markdown


def test_seed_profile_carries_the_seed_hyperparameters() -> None:
    cfg = load_config("pubmedqa-ko-llama31-8b-seed")
    assert cfg.model.base_model == "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
    assert cfg.data.source == "ChuGyouk/PubMedQA-test-Ko"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (16, 16, 0.0, "none")
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.warmup_steps, t.max_steps) == (3, 4, 5, 60)
    assert (t.learning_rate, t.seed, t.gradient_checkpointing, t.packing) == (2e-4, 3407, "unsloth", False)
    assert (cfg.model.max_seq_length, cfg.eval.eval_steps) == (512, 10)


def test_shipped_default_keeps_the_seed_optimisation_in_a_faster_shape() -> None:
    seed, default = load_config("pubmedqa-ko-llama31-8b-seed"), load_config("pubmedqa-ko-llama31-8b")
    per_step = lambda t: t.per_device_train_batch_size * t.gradient_accumulation_steps  # noqa: E731
    assert per_step(default.train) == per_step(seed.train) == 12
    assert default.train.group_by_length and default.train.padding_free is False
    assert (default.train.pad_to_multiple_of, default.train.uncheckpointed_layers) == (64, "auto")
    # the seed's batches and order, with the two options that change no update (lengths in steps of
    # 64, no recompute: tested in test_train_eval); the default uses them too
    assert (seed.train.pad_to_multiple_of, seed.train.uncheckpointed_layers) == (64, 32)
    assert (seed.train.group_by_length, seed.train.padding_free) == (False, False)
    same = ("warmup_steps", "max_steps", "learning_rate", "lr_scheduler_type", "optim", "seed", "packing",
            "gradient_checkpointing")
    assert {k: getattr(default.train, k) for k in same} == {k: getattr(seed.train, k) for k in same}
    assert default.lora == seed.lora and default.model == seed.model


def test_exaone_profile_inherits_and_overrides() -> None:
    cfg = load_config("exaone-3.5-2.4b")
    assert cfg.model.base_model == "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"
    assert (cfg.train.num_train_epochs, cfg.train.learning_rate, cfg.train.per_device_train_batch_size) == (3, 1e-5, 1)
    assert (cfg.train.max_steps, cfg.train.warmup_ratio, cfg.train.optim) == (-1, 0.1, "adamw_torch")
    assert cfg.lora.r == 16  # inherited from the seed profile


def test_demo_profile_keeps_the_seed_training_shape() -> None:
    seed, demo = load_config("pubmedqa-ko-llama31-8b"), load_config("demo")
    assert demo.model.base_model != seed.model.base_model
    same = ("per_device_train_batch_size", "gradient_accumulation_steps", "warmup_steps", "max_steps",
            "lr_scheduler_type", "seed", "gradient_checkpointing", "packing", "group_by_length")
    assert {k: getattr(demo.train, k) for k in same} == {k: getattr(seed.train, k) for k in same}
    assert demo.lora.model_dump(exclude={"train_lm_head"}) == seed.lora.model_dump(exclude={"train_lm_head"})
    assert demo.model.max_seq_length == seed.model.max_seq_length
    assert demo.registry.min_delta == seed.registry.min_delta


def test_overrides_are_validated_and_typed() -> None:
    cfg = load_config("demo", parse_overrides(["train.learning_rate=1e-4", "lora.r=8"]))
    assert cfg.train.learning_rate == 1e-4 and cfg.lora.r == 8
    with pytest.raises(ConfigError, match="train.learning_rte"):
        load_config("demo", {"train.learning_rte": 1e-4})
    with pytest.raises(ConfigError, match="lora.r"):
        load_config("demo", {"lora.r": 0})
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["learning_rate"])


def test_unknown_profile_names_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="pubmedqa-ko-llama31-8b"):
        load_config("no-such-profile")


def test_profile_inheritance_loop_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    monkeypatch.setenv("RETRAIN_PROFILES_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="loops"):
        load_config("a")


def test_airflow_params_override_only_when_given() -> None:
    base = load_config("demo")
    cfg = config_from_params({"profile": "demo", "learning_rate": 0.01, "max_steps": None, "dataset": ""})
    assert cfg.train.learning_rate == 0.01
    assert cfg.train.max_steps == base.train.max_steps
    assert cfg.data.source == base.data.source
    assert set(PARAM_PATHS.values()) <= set(cfg.flat())


def test_flat_lists_every_field_once() -> None:
    flat = PipelineConfig().flat()
    assert flat["train.learning_rate"] == 2e-4
    assert flat["registry.model_name"] == "pubmedqa-ko-llama31-8b-lora"
    assert not any(isinstance(v, dict) for v in flat.values())


def test_gradient_checkpointing_accepts_yaml_booleans() -> None:
    assert load_config("e2e", {"train.gradient_checkpointing": True}).train.gradient_checkpointing == "true"
    assert load_config("e2e", {"train.gradient_checkpointing": False}).train.gradient_checkpointing == "false"
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config("e2e", {"train.gradient_checkpointing": "sometimes"})


SHIPPED = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_builds_its_config_and_states_only_what_differs(name: str) -> None:
    cfg = load_config(name)
    assert cfg.profile == name and cfg.description
    assert PromptFormat.from_config(cfg).max_length == cfg.model.max_seq_length
    text = (PROFILES_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    assert re.match(r"# (make \w+|python -m ml \w+)", text), f"{name}.yaml must open with the command that runs it"
    own, parent = read_profile(name)
    inherited = (load_config(parent) if parent else PipelineConfig()).flat()
    for dotted, value in _leaves(own).items():
        if dotted == "description":
            continue
        *section, key = dotted.split(".")
        alone = {section[0]: {key: value}} if section else {key: value}
        changed = (load_config(parent, {dotted: value}) if parent else PipelineConfig.model_validate(alone)).flat()
        assert changed[dotted] != inherited[dotted], f"{name}.yaml restates {dotted}: {value!r}, as inherited"


def test_the_code_defaults_are_the_default_profile() -> None:
    default = load_config(DEFAULT_PROFILE)
    assert default.model_dump(exclude={"description"}) == PipelineConfig().model_dump(exclude={"description"})


def test_every_setting_is_documented_and_the_reference_is_current() -> None:
    for section, model in [("", PipelineConfig), *SECTIONS.items()]:
        for key, field in model.model_fields.items():
            assert field.description or key in SECTIONS, f"{section}.{key} has no description"
    doc = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert doc == reference_markdown(), "docs/settings.md is stale: python -m ml config --reference > docs/settings.md"


def test_the_dataset_uri_names_a_hub_dataset_or_a_local_file() -> None:
    """How an upstream job names the dataset when it announces new data (the DAG's Airflow Asset)."""
    from ml.config import project_root

    assert load_config("pubmedqa-ko-llama31-8b").data.uri == "hf://datasets/ChuGyouk/PubMedQA-test-Ko"
    pinned = load_config("pubmedqa-ko-llama31-8b", {"data.revision": "v2"}).data.uri
    assert pinned == "hf://datasets/ChuGyouk/PubMedQA-test-Ko@v2"
    assert load_config("demo").data.uri == (project_root() / "data/sample/pubmedqa_ko_sample.jsonl").as_uri()


def test_a_runs_profile_cannot_change_the_deploy_settings_the_dag_was_parsed_with() -> None:
    """The trigger form's profile changes how a run trains, not the DAG's schedule, queue, retries or cap."""
    assert load_config("e2e-manual").deploy.schedule is None  # tests/conftest.py: a profile without a schedule
    cfg = config_from_params({"profile": "e2e-manual"})
    assert cfg.profile == "e2e-manual" and cfg.deploy == load_config().deploy and cfg.deploy.schedule == "@weekly"


def test_a_run_takes_profile_names_from_the_profile_folders_only(tmp_path: Path) -> None:
    elsewhere = tmp_path / "demo.yaml"
    elsewhere.write_text("extends: demo\n")
    for name in (str(elsewhere), "../ml/profiles/demo", "no-such-profile"):
        with pytest.raises(ConfigError, match="a run takes one of .*demo"):
            config_from_params({"profile": name})
    assert config_from_params({"profile": "demo"}).profile == "demo"


def test_the_form_reads_local_paths_only_inside_its_roots(tmp_path: Path) -> None:
    from ml.config import project_root

    sample = "data/sample/pubmedqa_ko_sample.jsonl"
    assert config_from_params({"profile": "demo", "dataset": sample}).data.source == sample
    assert config_from_params({"profile": "demo", "dataset": "ChuGyouk/PubMedQA-test-Ko"}).data.is_local is False
    outside = tmp_path / "secrets.jsonl"
    outside.write_text("{}")
    for param, value in (("dataset", str(outside)), ("dataset", "data/../../etc/passwd.jsonl"),
                         ("base_model", "/etc"), ("dataset", str(project_root() / "ml" / "config.py"))):
        with pytest.raises(ConfigError, match=f"{param} .* is outside the folders the trigger form may read"):
            config_from_params({"profile": "demo", param: value})


def test_form_paths_resolve_against_the_project_root_from_any_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose image runs tasks in another working directory than the project root: a folder there,
    reachable as `sub/../outside` or named like a hub id, is never read in place of the setting's."""
    import shutil

    from conftest import SAMPLE

    from ml.config import project_root
    from ml.sources import read_records

    for decoy in ("sub", "outside", "org/data", "gpt2"):
        (tmp_path / decoy).mkdir(parents=True)
        shutil.copy(SAMPLE, tmp_path / decoy / "train.jsonl")  # 80 rows `datasets` would read as a folder
    monkeypatch.chdir(tmp_path)
    sample = "data/sample/pubmedqa_ko_sample.jsonl"
    assert len(read_records(config_from_params({"profile": "demo", "dataset": sample}).data)) == 80  # the root's
    for param in ("dataset", "base_model"):
        with pytest.raises(ConfigError, match=f"{param} 'sub/../outside' is outside the folders the trigger form"):
            config_from_params({"profile": "demo", param: "sub/../outside"})
        for hub_id in ("org/data", "gpt2"):  # the loaders try a folder of that name in the working directory first
            with pytest.raises(ConfigError, match=f"{hub_id!r} is a hub id, but {tmp_path / hub_id} in the working"):
                config_from_params({"profile": "demo", param: hub_id})
        for value in ("a/b/../../../outside", "not a hub id", "org/na--me", "org/x/"):
            with pytest.raises(ConfigError, match="outside the folders|neither an existing path"):
                config_from_params({"profile": "demo", param: value})
    # from the CLI (not confined to the form's folders) the same path is the project root's, never the decoy
    cli = load_config("demo", {"data.source": "sub/../outside"})
    assert cli.data.is_local and cli.data.uri == (project_root() / "sub/../outside").as_uri()
    with pytest.raises(DataError, match=f"dataset file not found: {project_root()}"):
        read_records(cli.data)


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("registry.model_name", "it's-mine", "found \"'\""), ("registry.model_name", "team/model", "found '/'"),
    ("registry.model_name", "m" * 300, "at most 255 bytes"), ("registry.model_name", "", "non-empty"),
    ("registry.model_name", "..", "not start with '.'"), ("registry.experiment", 'say "hi"', "found '\"'"),
    ("registry.experiment", "exp:1", "found ':'"), ("registry.champion_alias", "v2", "not an MLflow alias"),
    ("registry.previous_alias", "previous champion", "not an MLflow alias"),
    ("lora.r", 10**9, "less than or equal to 1024"), ("lora.alpha", 10**9, "less than or equal to 2048"),
    ("registry.min_delta", 1e308, "less than or equal to 1"), ("train.learning_rate", 1e9, "less than or equal to 1"),
    ("train.learning_rate", float("nan"), "finite number"), ("train.weight_decay", float("inf"), "finite number"),
    ("train.seed", -1, "greater than or equal to 0")])
def test_names_and_numbers_a_run_cannot_use_are_refused_before_any_work(setting: str, value: Any, message: str) -> None:
    """Before: a quote in the model name broke every later register's filter string, '/' was refused at
    register, a learning rate of 1e9 trained to NaN and the form took lora_r 1e9 and min_delta 1e308."""
    with pytest.raises(ConfigError, match=f"{re.escape(setting)}: .*{message}"):
        load_config("demo", {setting: value})


def test_the_form_takes_the_bounds_of_its_numbers_from_the_config() -> None:
    from ml.params import param_schemas

    schemas = param_schemas()
    assert [schemas[k]["allOf"][0]["maximum"] for k in ("lora_r", "lora_alpha", "min_delta", "learning_rate")] == \
        [1024, 2048, 1, 1]
    for param, value in (("lora_r", 10**9), ("lora_alpha", 4096), ("min_delta", 1e308), ("learning_rate", 1e9)):
        with pytest.raises(ConfigError, match=f"{PARAM_PATHS[param]}: Input should be less than or equal"):
            config_from_params({"profile": "demo", param: value})


# A valid value other than the default, where adding one, halving or negating does not give one.
OTHER_VALUE = {"registry.confidence": 0.9, "validation.script_mostly": 0.5, "data.columns": {"QUESTION": "q"},
               "data.id_column": "PMID", "data.revision": "v2", "model.revision": "v2", "lora.top_k_layers": 2,
               "registry.tracking_uri": "sqlite:///elsewhere.db", "registry.artifact_location": "elsewhere",
               "train.padding_free": True, "validation.script": "latin", "train.warmup_ratio": 0.1,
               "lora.dropout": 0.1, "registry.guardrails": [], "train.uncheckpointed_layers": 12,
               "train.gpu_memory_fraction": 0.3}


def _other(dotted: str, value: Any) -> Any:
    if dotted in OTHER_VALUE:
        return OTHER_VALUE[dotted]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, list):  # a [min, max] pair gets a larger max
        return [value[0], value[1] + 1] if value and isinstance(value[0], int) else [*value, "x"]
    section, _, name = dotted.partition(".")
    choices = getattr((SECTIONS[section] if name else PipelineConfig).model_fields[name or section].annotation,
                      "__args__", ())
    return next((c for c in choices if isinstance(c, str) and c != value), f"{value}-x")


@pytest.mark.parametrize("dotted", sorted(PipelineConfig().flat()))
def test_every_setting_has_one_role_and_only_training_settings_change_the_skip_hash(dotted: str) -> None:
    """The skip-when-unchanged hash and the review card count training settings only: a new field must
    be classified in ml.config.ROLES to pass, and its role must match what it does to the hash."""
    from ml.identity import config_hash
    from ml.review_card import config_changes, param_value

    base = PipelineConfig()
    tree = base.model_dump(mode="json")
    *section, key = dotted.split(".")
    (tree[section[0]] if section else tree)[key] = _other(dotted, base.flat()[dotted])
    changed = PipelineConfig.model_validate(tree)
    assert changed.flat()[dotted] != base.flat()[dotted]
    logged = {k: param_value(v) for k, v in base.flat().items()}  # the champion's params, as MLflow holds them
    shown = [k for k, _, _ in config_changes(changed.flat(), logged)]
    if role(dotted) == "training":
        assert config_hash(changed) != config_hash(base) and shown == [dotted]
    else:
        assert role(dotted) == "operational"
        assert config_hash(changed) == config_hash(base) and shown == []
