"""The installer's dialog on the console, pure over text in and out: which disk gets the system
(confirmed by typing ERASE), which disks become the first pool, and the console's root password.
:mod:`installer` runs it on a terminal; the tests run it over strings and ptys.
"""

from __future__ import annotations

import os
import termios
from dataclasses import dataclass, field
from typing import Literal, Protocol, TextIO

from image.appliance_os.installer_disks import Disk

MIN_PASSWORD = 8


class LineSource(Protocol):
    def readline(self) -> str: ...


class Aborted(Exception):
    """The console closed (end of input)."""


@dataclass(frozen=True)
class Choice:
    action: Literal["install", "rescan", "poweroff"]
    system: Disk | None = None
    pool: tuple[Disk, ...] = ()
    #: The console password for root; None leaves root locked (no console login).
    root_password: str | None = field(default=None, repr=False)


def _read(inp: LineSource, out: TextIO, prompt: str) -> str:
    out.write(prompt)
    out.flush()
    line = inp.readline()
    if not line:
        raise Aborted("the console closed")
    return line.strip()


def _read_secret(inp: LineSource, out: TextIO, prompt: str) -> str:
    """A line typed without echo on a terminal (as is) or read as it comes elsewhere."""
    fd = getattr(inp, "fd", None)  # TtyInput
    if fd is None and hasattr(inp, "fileno"):  # sys.stdin
        try:
            fd = inp.fileno()
        except (OSError, ValueError):  # a StringIO has none
            fd = None
    tty = fd if isinstance(fd, int) and os.isatty(fd) else None
    saved = None
    if tty is not None:
        saved = termios.tcgetattr(tty)
        quiet = termios.tcgetattr(tty)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(tty, termios.TCSANOW, quiet)
    try:
        out.write(prompt)
        out.flush()
        line = inp.readline()
    finally:
        if tty is not None and saved is not None:
            termios.tcsetattr(tty, termios.TCSANOW, saved)
            out.write("\n")  # the Enter that ended the line was not echoed either
    if not line:
        raise Aborted("the console closed")
    return line.rstrip("\r\n")


def ask_root_password(inp: LineSource, out: TextIO) -> str | None:
    """The console's root password, typed twice; Enter alone keeps the console locked."""
    while True:
        first = _read_secret(
            inp, out, "Password for root on the console (Enter for none: no console login): "
        )
        if not first:
            out.write("No console login: root stays locked (the page does everything).\n")
            return None
        if len(first) < MIN_PASSWORD:
            out.write(f"At least {MIN_PASSWORD} characters, please.\n")
            continue
        if ":" in first or "\n" in first:
            out.write("The password must not contain ':'.\n")
            continue
        if _read_secret(inp, out, "The same password again: ") != first:
            out.write("The two passwords differ.\n")
            continue
        return first


def _parse_pool(answer: str, count: int, system: int) -> tuple[list[int], str | None]:
    """Numbers of the pool disks, or the reason the answer is refused."""
    numbers: list[int] = []
    for word in answer.replace(",", " ").split():
        if not word.isdigit():
            return [], f"'{word}' is not a number."
        n = int(word)
        if not 1 <= n <= count:
            return [], f"{n} is not in the list (1-{count})."
        if n == system:
            return [], f"{n} is the system disk; it cannot be in the pool."
        if n in numbers:
            return [], f"{n} is listed twice."
        numbers.append(n)
    return numbers, None


def ask(inp: LineSource, out: TextIO, disks: list[Disk]) -> Choice:
    """Ask which disk to install on (confirmed with ERASE) and which disks form the first pool."""
    if not disks:
        out.write("\nNo disk to install on was found (the installer's own disk is not offered).\n")
        while True:
            answer = _read(inp, out, "Type r to look again or p to power off: ").lower()
            if answer in ("r", "p"):
                return Choice("rescan" if answer == "r" else "poweroff")
            out.write("Please type r or p.\n")
    count = len(disks)
    while True:
        out.write("\nDisks found:\n")
        for i, disk in enumerate(disks, 1):
            out.write(f"  {i}) {disk.line}\n")
        out.write("(r looks for disks again, p powers off)\n")
        answer = _read(inp, out, f"Install the appliance on which disk? [1-{count}] ").lower()
        if answer in ("r", "p"):
            return Choice("rescan" if answer == "r" else "poweroff")
        if not answer.isdigit() or not 1 <= int(answer) <= count:
            out.write(f"Please type a number from 1 to {count}.\n")
            continue
        number = int(answer)
        system = disks[number - 1]
        out.write(f"\nWARNING: everything on this disk will be erased:\n  {system.line}\n")
        if _read(inp, out, "Type ERASE to erase it and install (anything else goes back): ") != (
            "ERASE"
        ):
            out.write("Nothing was erased.\n")
            continue
        break
    pool: list[Disk] = []
    if count > 1:
        out.write("\n")
        for i, disk in enumerate(disks, 1):
            mark = "   (system disk)" if i == number else ""
            out.write(f"  {i}) {disk.line}{mark}\n")
        while True:
            answer = _read(
                inp,
                out,
                "Which disks become the first pool? Numbers separated by spaces, Enter for none: ",
            )
            numbers, reason = _parse_pool(answer, count, number)
            if reason is None:
                pool = [disks[n - 1] for n in numbers]
                break
            out.write(reason + "\n")
    out.write("\n")
    password = ask_root_password(inp, out)
    out.write("\nSummary:\n")
    out.write(f"  system disk (erased now): {system.line}\n")
    if pool:
        out.write("  first pool (formatted later, when you confirm it on the page):\n")
        for disk in pool:
            out.write(f"    {disk.line}\n")
    else:
        out.write("  first pool: none (choose one on the page later)\n")
    out.write(f"  console login: {'root, with the password typed' if password else 'none'}\n")
    out.flush()
    return Choice("install", system, tuple(pool), password)
