"""Keys for a running VM's console: text typed as keystrokes, and Ctrl-Alt-Del, through QMP.

The live console itself is QEMU's VNC server on a unix socket of the session (relayed to the
browser by the service); this module covers what a VNC client cannot do well: paste a password
or a command line into a guest that has no clipboard, and send Ctrl-Alt-Del, which the browser's
own machine would catch.

:func:`text_to_keys` is pure: each character becomes one chord of QEMU key codes (``qcode``) on a
US keyboard layout, the layout a guest has before anyone configures it. A character without a
key on that layout is refused as a whole (nothing is typed), naming the characters. QMP
``send-key`` queues its key events inside QEMU with ``hold-time`` between press and release, so
the call returns at once and successive chords are typed in order.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Protocol

from appliance.errors import Conflict, InvalidInput

#: The most characters one paste may type (about a screenful of commands).
MAX_TEXT = 2000
#: How long each chord is held down (ms): long enough for a busy TCG guest's keyboard driver.
HOLD_MS = 30
CTRL_ALT_DEL = ("ctrl", "alt", "delete")

_UNSHIFTED = {
    " ": "spc",
    "\n": "ret",
    "\t": "tab",
    "-": "minus",
    "=": "equal",
    "[": "bracket_left",
    "]": "bracket_right",
    "\\": "backslash",
    ";": "semicolon",
    "'": "apostrophe",
    "`": "grave_accent",
    ",": "comma",
    ".": "dot",
    "/": "slash",
}
#: Characters typed with Shift held, by the key that carries them on a US keyboard.
_SHIFTED = {
    "!": "1",
    "@": "2",
    "#": "3",
    "$": "4",
    "%": "5",
    "^": "6",
    "&": "7",
    "*": "8",
    "(": "9",
    ")": "0",
    "_": "minus",
    "+": "equal",
    "{": "bracket_left",
    "}": "bracket_right",
    "|": "backslash",
    ":": "semicolon",
    '"': "apostrophe",
    "~": "grave_accent",
    "<": "comma",
    ">": "dot",
    "?": "slash",
}


class KeySender(Protocol):
    """What sends keys: a QMP client (:class:`image.qmp.QmpClient`) has this method."""

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> object: ...


def key_chord(char: str) -> tuple[str, ...] | None:
    """The qcodes typing ``char`` on a US layout (Shift first where needed); None if none does."""
    if char in string.ascii_lowercase or char in string.digits:
        return (char,)
    if char in string.ascii_uppercase:
        return ("shift", char.lower())
    if char in _UNSHIFTED:
        return (_UNSHIFTED[char],)
    if char in _SHIFTED:
        return ("shift", _SHIFTED[char])
    return None


def text_to_keys(text: str) -> list[tuple[str, ...]]:
    """One chord per character of ``text`` (``\\r\\n`` and ``\\r`` count as one Enter).

    Raises :class:`InvalidInput` (nothing typed) for empty or too long text and for characters
    that have no key on a US keyboard.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text:
        raise InvalidInput("there is no text to type")
    if len(text) > MAX_TEXT:
        raise InvalidInput(
            f"at most {MAX_TEXT} characters can be typed at once, not {len(text)}",
            limit=MAX_TEXT,
        )
    chords: list[tuple[str, ...]] = []
    missing: list[str] = []
    for char in text:
        chord = key_chord(char)
        if chord is None:
            if char not in missing:
                missing.append(char)
            continue
        chords.append(chord)
    if missing:
        shown = ", ".join(repr(c) for c in missing[:10])
        raise InvalidInput(
            f"these characters have no key on a US keyboard and cannot be typed: {shown}",
            characters=missing[:10],
        )
    return chords


def send_chords(qmp: KeySender, chords: Sequence[Sequence[str]], hold_ms: int = HOLD_MS) -> int:
    """Send each chord with QMP ``send-key``, in order; returns how many were sent."""
    for chord in chords:
        keys = [{"type": "qcode", "data": key} for key in chord]
        qmp.execute("send-key", {"keys": keys, "hold-time": hold_ms})
    return len(chords)


def type_text(qmp: KeySender, text: str, hold_ms: int = HOLD_MS) -> int:
    """Type ``text`` into the VM (validated first: all of it or nothing); the characters typed."""
    return send_chords(qmp, text_to_keys(text), hold_ms)


def send_ctrl_alt_del(qmp: KeySender) -> None:
    send_chords(qmp, [CTRL_ALT_DEL], hold_ms=100)


class ConsoleUnavailable(Conflict):
    """The VM's console cannot be opened now."""

    code = "console_unavailable"


class ConsoleLimit(Conflict):
    """Too many consoles of this VM are open."""

    code = "console_limit"


#: Session states in which the VM runs and its console can be opened.
CONSOLE_STATES = frozenset({"booting", "running", "migrating"})
#: Consoles one VM may have open at once (each is a VNC client of QEMU).
MAX_CONSOLES = 4


def check_console(
    session_id: str,
    *,
    state: str,
    running_here: bool,
    has_socket: bool,
    open_consoles: int,
    limit: int = MAX_CONSOLES,
) -> None:
    """Whether a console of the session may open now; raises the reason it may not.

    ``running_here``: the VM's QEMU runs under this service; ``has_socket``: that QEMU was
    started with a VNC socket (a VM started by an older version of the service has none).
    """
    if state not in CONSOLE_STATES or not running_here:
        raise ConsoleUnavailable(
            f"the VM of failover session {session_id} is not running ({state}): "
            "its console is closed",
            session=session_id,
            state=state,
        )
    if not has_socket:
        raise ConsoleUnavailable(
            f"the VM of failover session {session_id} was started without a console; "
            "only its screenshot can be shown",
            session=session_id,
        )
    if open_consoles >= limit:
        raise ConsoleLimit(
            f"{open_consoles} consoles of this VM are open already (at most {limit}); "
            "close one first",
            session=session_id,
            limit=limit,
        )
