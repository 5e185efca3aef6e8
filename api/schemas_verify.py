"""Request and response schemas of the store's verify schedule (``/api/settings/verify``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from api.schemas import Cron, Request


class VerifyScheduleUpdate(Request):
    #: When a slice of the store is verified (a five-field cron, in the appliance's time zone);
    #: null: never by itself.
    cron: Cron | None = Field(default=None, examples=["0 2 * * *"])


class VerifySchedulePublic(BaseModel):
    cron: str | None
    #: The scheduler's time zone (the settings' ``timezone``), in which ``cron`` is read.
    timezone: str
    #: What each run reads at most (the settings' ``verify_max_bytes``); null: the whole store.
    max_bytes: int | None
    next_at: datetime | None
    #: The slot the schedule last ran for (or when it was set); null: never set.
    last_slot: datetime | None
