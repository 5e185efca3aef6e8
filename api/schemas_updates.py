"""Schemas of the updates API: the running release, its changelog, and the upgrade's state."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ReleasePublic(BaseModel):
    version: str
    built: str


class UpgradeStepPublic(BaseModel):
    name: str
    state: str  # running, done, failed
    started: str | None = None
    seconds: float | None = None
    detail: str | None = None


class UpgradeAttemptPublic(BaseModel):
    from_version: str | None = None
    to_version: str | None = None
    started: str | None = None
    finished: str | None = None
    #: queued, running, upgraded, rolled back, failed, interrupted
    outcome: str
    reason: str | None = None
    catalog_backup: str | None = None
    catalog_note: str | None = None
    seconds: float | None = None
    rollback_seconds: float | None = None
    steps: list[UpgradeStepPublic] = []


class UpgradeStatePublic(BaseModel):
    running: bool
    current: UpgradeAttemptPublic | None = None
    history: list[UpgradeAttemptPublic] = []

    @classmethod
    def of(cls, state: dict[str, Any]) -> UpgradeStatePublic:
        return cls.model_validate(state)


class SystemReleasePublic(BaseModel):
    version: str
    previous_version: str | None
    releases: list[ReleasePublic]
    #: The running release's CHANGELOG.md (Markdown), or None when there is none.
    changelog: str | None
    #: False in a checkout: updates come from git there, not from the page.
    updates_from_page: bool
    upgrade: UpgradeStatePublic
