"""The retrain's schedule: a cron time runs only when the scheduler reaches it on time.

`OnTimeCronTimetable` is Airflow's `CronTriggerTimetable` with one rule added (catchup=False): a
scheduled time runs when the scheduler reaches it within `GRACE` (10 minutes); a time missed by more
- the DAG paused across it, or Airflow down - is skipped, and the next time runs when it comes.
Airflow's own rule would run the latest missed time at once, at the unpause (a retrain on the GPU
that nobody expected). The first scheduled run, with no earlier one, is the first time at or after
now (`run_immediately=timedelta(0)`, the DAG's rule before this class): no grace there, so a first
time the scheduler has not yet started when the DAG processor re-reads the file waits a week.

Why 10 minutes: the scheduler creates a due run within seconds (its loop) and the DAG processor
re-reads the file every 30 s, recomputing the next run each time (paused too); a slow parse or a
restarted scheduler takes a minute or two. Ten minutes covers all of it, so a run due a few seconds
ago is not lost, while an unpause more than 10 minutes after a missed time waits for the next.
The cost: Airflow down for longer than that across a scheduled time skips that run too (trigger it
by hand; an asset event for the dataset still starts one).

Catchup (a backfill, `catchup=True`) is Airflow's rule unchanged: every time in the range.

The scheduler stores the DAG serialized and reads the timetable back by its import path, which
works only for a class a plugin registers: `RetrainSchedulePlugin.timetables` does.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import airflow.timetables.trigger as stock
from airflow._shared.timezones.timezone import coerce_datetime, parse_timezone
from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction
from airflow.timetables.trigger import CronTriggerTimetable

GRACE = timedelta(minutes=10)


def _minutes(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


class OnTimeCronTimetable(CronTriggerTimetable):
    """A cron schedule that never runs a missed time late: a time the scheduler reaches more than
    `grace` after it (paused, or Airflow down) is skipped, and the next one runs on its time."""

    def __init__(self, cron: str, *, timezone: Any, grace: timedelta = GRACE) -> None:
        super().__init__(cron, timezone=timezone, run_immediately=timedelta(0))
        self.grace = grace
        self.description = (f"{self.description} ({self._timezone_name()}); a time missed by more than "
                            f"{_minutes(grace)} (paused, or Airflow down) is skipped, not run late")

    def _timezone_name(self) -> str:
        return str(getattr(self._timezone, "name", self._timezone))

    @property
    def summary(self) -> str:
        return f"{self._expression} (missed times skipped)"

    def serialize(self) -> dict[str, Any]:
        from airflow.serialization.encoders import encode_timezone

        return {"expression": self._expression, "timezone": encode_timezone(self._timezone),
                "grace_s": self.grace.total_seconds()}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> OnTimeCronTimetable:
        return cls(data["expression"], timezone=parse_timezone(data["timezone"]),
                   grace=timedelta(seconds=data["grace_s"]))

    def next_dagrun_info(self, *, last_automated_data_interval: DataInterval | None,
                         restriction: TimeRestriction) -> DagRunInfo | None:
        info = super().next_dagrun_info(last_automated_data_interval=last_automated_data_interval,
                                        restriction=restriction)
        if info is None or restriction.catchup:
            return info
        now = coerce_datetime(stock.utcnow())  # the clock Airflow's CronTriggerTimetable reads
        if now - info.run_after <= self.grace:
            return info  # due later, or due now and reached on time
        # Airflow's choice is the latest time at or before now (catchup=False), so no time lies
        # between `now - grace` and now: the next one is after now.
        later = self._align_to_next(now)
        if restriction.latest is not None and restriction.latest < later:
            return None
        return DagRunInfo.interval(coerce_datetime(later - self._interval), later)


class RetrainSchedulePlugin(AirflowPlugin):
    name = "retrain_schedule"
    timetables = [OnTimeCronTimetable]
