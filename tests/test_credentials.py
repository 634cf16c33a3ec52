"""Credentials in a tracking URI (`http://user:password@host`) reach MLflow and nothing else: not the
logs (MLflow's own "View run ... at: <uri>" lines included), params, tags, the run folder's files or
the registry's artifacts."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import MlflowServer

from ml.config import load_config, move_credentials, redact
from ml.errors import ConfigError, RegistryUnavailable
from ml.review_card import param_value

PASSWORD = "pa:ss@w0rd-never-shown"  # a ':' and an '@' inside, percent-encoded in the URI
IN_URI = "pa%3Ass%40w0rd-never-shown"


@pytest.fixture()
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's MLflow credentials as they were after the test (the config moves a URI's there)."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_a_uris_credentials_move_to_the_environment_and_the_config_keeps_none(no_credentials: None) -> None:
    cfg = load_config("e2e", {"registry.tracking_uri": f"https://pipeline:{IN_URI}@mlflow.example:5000/"})
    assert cfg.registry.tracking_uri == "https://mlflow.example:5000/"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("pipeline", PASSWORD)
    assert IN_URI not in cfg.model_dump_json() and PASSWORD not in cfg.model_dump_json()
    with pytest.raises(ConfigError, match=r"registry.tracking_uri: .*postgresql://\*\*\*@db/mlflow holds credentials"):
        load_config("e2e", {"registry.tracking_uri": f"postgresql://mlflow:{IN_URI}@db/mlflow"})
    assert move_credentials("sqlite:///state/mlflow.db") == "sqlite:///state/mlflow.db"


def test_uris_are_redacted_wherever_they_are_printed_or_logged_as_params() -> None:
    text = f"MLflow at http://u:{PASSWORD}@host:5000/api (and https://token@h/x?a=b@c) failed"
    assert redact(text) == "MLflow at http://***@host:5000/api (and https://***@h/x?a=b@c) failed"
    assert param_value(f"http://u:{IN_URI}@host") == "http://***@host"
    assert redact("sqlite:///a/b.db and file:///x@y") == "sqlite:///a/b.db and file:///x@y"


@pytest.mark.slow
def test_a_run_with_a_password_in_its_tracking_uri_shows_it_nowhere(
        evaluated_run: tuple[Any, Any], tmp_path: Path, no_credentials: None, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The session's trained and evaluated run, frozen again under a config whose tracking URI holds the
    password of MLflow with basic auth, goes through preflight, register and promote: every log line
    (MLflow's "View run" lines too), param, tag and description of its runs and version, and every file
    of the run folder and of the server's stores (the server's own auth config aside) are free of it. A
    later step, a process of its own that reads the frozen config, still connects: its live config puts
    the credentials in its environment, as every Airflow task builds it from the form and the profile."""
    import mlflow
    from mlflow import MlflowClient

    from ml import pipeline, tracking
    from ml.runs import run_paths

    server = MlflowServer(tmp_path / "mlflow", admin_password=PASSWORD)
    server.start()
    caplog.set_level(logging.INFO)
    try:
        overrides = {"output_dir": str(tmp_path / "runs"), "registry.model_name": "credentials",
                     "registry.tracking_uri": server.url.replace("://", f"://admin:{IN_URI}@")}
        cfg = load_config("e2e", overrides)
        paths = run_paths(cfg, "creds")
        shutil.copytree(evaluated_run[1].root, paths.root)
        (paths.root / "config.json").unlink()  # frozen anew, from this config
        cfg = pipeline.freeze(cfg, paths)
        assert pipeline.preflight(cfg, paths, "creds") is None
        pipeline.register(cfg, paths, "creds")
        assert pipeline.promote(cfg, paths, "creds")["promoted"]

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)  # this test's reads
        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
        (version,) = client.search_model_versions("name='credentials'")
        out, err = capfd.readouterr()
        shown = [out, err, caplog.text, version.description, *version.tags.values()]
        for run in runs:
            shown += [*run.data.params.values(), *run.data.tags.values()]
        for text in shown:
            assert PASSWORD not in text and IN_URI not in text, text
        # MLflow's own lines were captured (the run named by its profile and date: ml/tracking.py run_title)
        assert f"View run {tracking.run_title('e2e', 'creds')} at: {server.url}/#/experiments/" in out
        assert [run.data.params["registry.tracking_uri"] for run in runs] == [server.url]
        files = [p for root in (paths.root, server.root) for p in root.rglob("*")
                 if p.is_file() and p.name != "basic_auth.ini"]  # the server's admin password, its own
        assert (server.root / "mlflow.db") in files and (paths.root / "config.json") in files
        assert any(p.name == "MLmodel" for p in files) and any(p.name == "decision.json" for p in files)
        for path in files:
            data = path.read_bytes()
            assert PASSWORD.encode() not in data and IN_URI.encode() not in data, path

        # another step's process: the frozen config alone has no credentials ...
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)
        frozen = pipeline.freeze(load_config("e2e"), paths)
        assert frozen.registry.tracking_uri == server.url
        with pytest.raises(RegistryUnavailable, match="401"):
            tracking.check_writable(frozen.registry)
        # ... and its live config brings them
        assert pipeline.freeze(load_config("e2e", overrides), paths) == frozen
        tracking.check_writable(frozen.registry)
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)
