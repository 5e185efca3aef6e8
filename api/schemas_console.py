"""Schemas of the console API: keys typed into a running VM."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from api.schemas import Request
from image.console import MAX_TEXT


class ConsoleKeys(Request):
    """Either ``text`` (typed as keystrokes, US layout) or ``combo`` (a key combination)."""

    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)] | None = None
    combo: Literal["ctrl-alt-delete"] | None = None


class ConsoleKeysPublic(BaseModel):
    session: str
    keys: int  # chords sent: one per character, or 1 for a combination


class ConsoleStatusPublic(BaseModel):
    """Whether a console can be offered for the session, and if not, why (for the page)."""

    session: str
    available: bool
    reason: str | None = None
    novnc: bool
    novnc_package: str
