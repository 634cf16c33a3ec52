"""The one owner of `@champion` and `@previous_champion`: reading them, fetching the champion,
the lock, the re-read before a move, and every move: the pipeline's promote and keep, a
person's promotion and rollback.

Every move happens under `lock`, after re-reading the alias it replaces (`move` refuses when it is
no longer where the caller saw it). The version that loses `@champion` keeps `@previous_champion`,
and the registered model records who moved it last (`SET_BY_TAG`), so that a pipeline run can tell
another run's promotion from a person's choice. Each function works on a connected client
(ml.tracking.connect).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ml import registry, tracking
from ml.config import RegistryConfig
from ml.errors import ConfigError, RegistryConflict
from ml.promotion import Decision
from ml.registry import Registered, visible
from ml.runs import Champion, read_champion, write_champion

log = logging.getLogger(__name__)

SET_BY_TAG = "champion_set_by"  # on the registered model: "pipeline <run key>" or "manual <user>"


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, None when none does; any other failure is raised (an alias
    read wrongly as absent would lose `previous_champion`)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        if exc.error_code == "PERMISSION_DENIED" and not visible(client, name):
            # A server with authentication answers 403, not 404, for a model that does not exist
            # (it tells no one what exists). A model this account cannot see has no champion for
            # it: registering creates the model, owned by this account, or fails naming the owner
            # problem when another account made it (ml.registry).
            return None
        raise


def version(client: MlflowClient, reg: RegistryConfig) -> str | None:
    """The version holding @champion, or None."""
    mv = alias_version(client, reg.model_name, reg.champion_alias)
    return str(mv.version) if mv is not None else None


def tags(client: MlflowClient, reg: RegistryConfig) -> dict[str, str] | None:
    """The champion version's tags and its number (`version`), or None when there is no champion."""
    mv = alias_version(client, reg.model_name, reg.champion_alias)
    return {**mv.tags, "version": str(mv.version)} if mv is not None else None


def set_by(client: MlflowClient, reg: RegistryConfig) -> str:
    """Who moved @champion last: "pipeline <run key>" or "manual <user>" ("" before any move)."""
    return str(client.get_registered_model(reg.model_name).tags.get(SET_BY_TAG, ""))


def fetch(client: MlflowClient, reg: RegistryConfig, folder: Path) -> Champion | None:
    """The champion a run competes with (None: the base model), downloaded into `folder`, unless
    that version is there already (fetched while the gate ran, or by an earlier attempt)."""
    fetched, champ = read_champion(folder)  # written once the download is complete
    if fetched and (champ.version if champ else None) == version(client, reg):
        return champ
    shutil.rmtree(folder, ignore_errors=True)
    champ = _download(client, reg, folder)
    write_champion(folder, champ)
    return champ


def _download(client: MlflowClient, reg: RegistryConfig, dst: Path) -> Champion | None:
    mv = alias_version(client, reg.model_name, reg.champion_alias)
    if mv is None:
        return None
    got = registry.download_version(client, reg, str(mv.version), dst)
    base = mv.tags.get("base_model", "")
    try:
        rows_file = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="reports/train_rows.json",
                                                        dst_path=str(dst / "run"))
        trained_rows = json.loads(Path(rows_file).read_text())
    except (MlflowException, OSError):  # a version from before rows were recorded
        trained_rows = None
    log.info("champion is version %s of %s (base %s)", mv.version, reg.model_name, base)
    return Champion(got.version, got.run_id, str(got.model_dir), str(got.adapter_dir), base,
                    str(got.base_path) if got.base_path else None, mv.tags.get("base_identity"),
                    got.model_config.get("prompt_format"), trained_rows)


@contextlib.contextmanager
def lock(client: MlflowClient, reg: RegistryConfig) -> Iterator[None]:
    """One alias move at a time for a registered model, across the processes of this machine (CLI
    runs, local executors); the DAG's registry pool of one slot serialises workers on other hosts."""
    key = hashlib.sha256(f"{client.tracking_uri}|{reg.model_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"ml-registry-{key}.lock"
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Moved:
    """@champion moved since a run was evaluated: where it is now, and who moved it."""
    now: str | None
    set_by: str

    @property
    def by_hand(self) -> bool:
        return self.set_by.startswith("manual")


def moved_since(client: MlflowClient, reg: RegistryConfig, evaluated: str | None, mine: str) -> Moved | None:
    """Whether @champion left `evaluated` (the version a run was scored against) for another than
    `mine` (this run's: a retry of an attempt that moved it finishes the bookkeeping). Call under `lock`."""
    now = version(client, reg)
    if now in (evaluated, mine):
        return None
    moved = Moved(now, set_by(client, reg))
    log.warning("@%s moved from %s to %s since this run was evaluated (%s)", reg.champion_alias, evaluated, now,
                moved.set_by)
    return moved


def move(client: MlflowClient, reg: RegistryConfig, to: str, expected: str | None, who: str) -> str | None:
    """Give @champion to version `to` if it still is at `expected` (call under `lock`); the version
    it leaves keeps @previous_champion. Returns that version. Already at `to` (a retry of an attempt
    that moved it), the move finishes its bookkeeping."""
    name, now = reg.model_name, version(client, reg)
    if now not in (expected, to):
        raise RegistryConflict(f"@{reg.champion_alias} is at {now}, not {expected}: it moved meanwhile")
    if now is not None and now != to:
        client.set_registered_model_alias(name, reg.previous_alias, now)
        client.set_model_version_tag(name, now, "superseded_by", to)
    client.set_registered_model_alias(name, reg.champion_alias, to)
    client.set_registered_model_tag(name, SET_BY_TAG, who)
    return now


def promote(client: MlflowClient, reg: RegistryConfig, registered: Registered, decision: Decision,
            expected: str | None, run_key: str) -> None:
    """The pipeline's promotion: @champion to the run's version, if it still is at `expected`
    (call under `lock`); the version is tagged promoted with the decision's numbers."""
    previous = move(client, reg, registered.version, expected, f"pipeline {run_key}")
    _record(client, reg, registered, "promoted", decision)
    log.info("promoted %s version %s to @%s (previous: %s)", reg.model_name, registered.version,
             reg.champion_alias, previous)


def keep(client: MlflowClient, reg: RegistryConfig, registered: Registered, decision: Decision) -> None:
    """The pipeline keeps the champion: the run's version is tagged rejected (or needs_review);
    every alias stays where it is."""
    _record(client, reg, registered, "needs_review" if decision.outcome == "needs_review" else "rejected", decision)
    log.info("%s version %s not promoted: %s", reg.model_name, registered.version, decision.reason)


def _record(client: MlflowClient, reg: RegistryConfig, registered: Registered, outcome: str,
            decision: Decision) -> None:
    registry.record_outcome(client, reg, registered.version, outcome, decision)
    tracking.record_outcome(client, registered.run_id, outcome, decision)


def manual_move(client: MlflowClient, reg: RegistryConfig, to: str | None, reason: str, action: str,
                prepare: Callable[[str], object] | None = None) -> dict[str, str | None]:
    """A person moves @champion: to version `to`, or (rollback, `to` None) back to @previous_champion.
    Recorded on both versions and the registered model: who, when, why. `prepare` runs under the lock
    with the version about to get @champion, before the move (its export); what it raises stops it."""
    if not reason.strip():
        raise ConfigError("a manual promotion or rollback needs a --reason")
    who, when = getpass.getuser(), datetime.now(UTC).isoformat(timespec="seconds")
    with lock(client, reg):
        now = version(client, reg)
        if to is None:
            previous = alias_version(client, reg.model_name, reg.previous_alias)
            if previous is None:
                raise RegistryConflict(f"no version holds @{reg.previous_alias}: nothing to roll back to")
            to = str(previous.version)
        try:
            client.get_model_version(reg.model_name, to)
        except MlflowException as exc:
            raise RegistryConflict(f"{reg.model_name} has no version {to}") from exc
        if to == now:
            raise RegistryConflict(f"version {to} already holds @{reg.champion_alias}")
        if prepare is not None:
            prepare(to)
        move(client, reg, to, now, f"manual {who}")
    note = f"{action} by {who} at {when}: {reason}"
    client.set_model_version_tag(reg.model_name, to, "decision", f"manual {action}")
    client.set_model_version_tag(reg.model_name, to, "manual_decision", note)
    if now is not None:
        client.set_model_version_tag(reg.model_name, now, "manual_decision", f"replaced by v{to}: {note}")
    log.info("%s: @%s %s -> %s", note, reg.champion_alias, now, to)
    return {"champion": to, "previous_champion": now, "by": who, "at": when, "reason": reason}
