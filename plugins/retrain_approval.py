"""The approval gate: the DAG's `promote_or_keep` task, a human-in-the-loop branch of Airflow 3's own
(`airflow.providers.standard.operators.hitl`).

It branches to `promote_champion` or `keep_champion` by the promotion rule. Where a run asks for a
person's approval (registry.approval: required) and the rule says promote, it asks instead: the
request (the review card: losses with their interval, every guardrail, sample answers, links to
the MLflow version and run) waits in Airflow's Required Actions, the task parked in Airflow's
awaiting-input state (no worker slot held while it waits). "Promote" or "Keep" and a comment come
back through the UI or the REST API from a logged-in user, whose name is recorded (an anonymous
answer is recorded without one, and is not taken as an approval); no answer within
the run's `registry.approval_timeout_h` takes the default, "Keep". What to ask and what to do with
the answer are the DAG's (`route`, `answered`): this module knows nothing of `ml`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

PROMOTE, KEEP = "Promote", "Keep"
# Who answers when every user is admin and nobody logs in (make airflow-ui): no identity, so an
# approval from it is not taken.
ANONYMOUS = "Anonymous"


@dataclass(frozen=True)
class Ask:
    """An approval request: its subject and body (markdown), and how long it waits for an answer."""
    subject: str
    body: str
    timeout: timedelta


class ApprovalGate(HITLBranchOperator):
    """`route(context)` -> (task id to branch to, None) when no person is needed, or (None, Ask);
    `answered(context, answer)` is told the person's answer (or the timeout's default) before the
    branch it chose runs: answer, by (None: nobody answered), at, comment, timed_out."""

    FORM = ("comment",)  # the request's own fields (a task's params also hold the DAG's)

    def __init__(self, *, route: Callable[[Any], tuple[str | None, Ask | None]],
                 answered: Callable[[Any, Mapping[str, Any]], None], promote_task: str, keep_task: str,
                 **kwargs: Any) -> None:
        params = kwargs.pop("params", None) or ParamsDict()  # the DAG's, merged in by Airflow
        params = params if isinstance(params, ParamsDict) else ParamsDict(params)
        params["comment"] = Param("", type="string", title="Comment",
                                  description="Why: recorded on the model version with your name.")
        super().__init__(subject="Approve the new model version?", options=[PROMOTE, KEEP], defaults=[KEEP],
                         options_mapping={PROMOTE: promote_task, KEEP: keep_task}, params=params, **kwargs)
        self.route, self.answered = route, answered

    def execute(self, context: Any) -> Any:
        branch, ask = self.route(context)
        if ask is None:
            assert branch is not None
            return self.do_branch(context, [branch])
        self.subject, self.body, self.response_timeout = ask.subject, ask.body, ask.timeout
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" not in event:  # a person's answer, or the default when nobody answered in time
            user = event.get("responded_by_user") or {}
            name = user.get("name") if isinstance(user, Mapping) else None
            at = event["responded_at"]
            self.answered(context, {
                "answer": event["chosen_options"][0], "by": None if name == ANONYMOUS else name,
                "at": at.isoformat(timespec="seconds") if hasattr(at, "isoformat") else str(at),
                "comment": str((event.get("params_input") or {}).get("comment") or ""),
                "timed_out": bool(event.get("timedout"))})
        return super().execute_complete(context, event)

    @property
    def serialized_params(self) -> dict[str, dict[str, Any]]:
        """Only the request's own fields: the form a person answers, and what an answer must hold."""
        return {k: v for k, v in super().serialized_params.items() if k in self.FORM}
