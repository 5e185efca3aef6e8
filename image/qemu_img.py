"""qemu-img as the appliance uses it: argv builders, parsers of its JSON, and thin runners.

Design: what to run and how to read the answer are pure functions (``*_argv``, ``parse_*``,
``extents_from_map``), tested on canned and real output; the runners only resolve the tool, start
it and convert failures into domain errors. No other module builds a qemu-img command line.

Invariants:

- Only formats in ``SUPPORTED_FORMATS`` ever reach a command line, and image paths must be
  absolute: a path can then never be read as an option (it starts with ``/``) nor as a protocol
  prefix such as ``json:`` or ``nbd:`` (qemu only looks for one before the first ``/``).
- A missing qemu-img is ``InvalidInput`` naming the install step; qemu-img refusing an image
  (corrupt, truncated, not in the stated format, unreadable) is ``SourceError`` carrying qemu-img's
  own message.
- ``extents_from_map`` covers ``[0, size)`` exactly, in order, with adjacent extents of the same
  kind merged; a region is a zero extent only when qemu says it reads as zeros (``zero``) or no
  layer of the backing chain holds it (``present`` false). Anything uncertain is data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.backup.disks import Extent
from appliance.errors import ApplianceError, InvalidInput, SourceError

#: Container formats the appliance reads and writes; nothing else is passed to qemu tools.
SUPPORTED_FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vdi", "vpc")

INSTALL_HINT = "apt-get install qemu-utils"

#: Creation options per target format. vpc rounds the size to a CHS geometry unless forced,
#: which would change the guest-visible size of a restored disk.
CREATE_OPTIONS: dict[str, tuple[str, ...]] = {"vpc": ("-o", "force_size=on")}

#: Runs of zeros at least this long are left as holes when converting (qemu-img's ``-S``).
SPARSE_BYTES = 4096

# qemu-img check exit codes (documented in qemu-img(1)).
CHECK_OK = 0
CHECK_ERRORS = 1
CHECK_CORRUPT = 2
CHECK_LEAKS = 3
CHECK_UNSUPPORTED = 63


@dataclass(frozen=True)
class ImageInfo:
    """The parts of ``qemu-img info`` the appliance relies on."""

    format: str
    virtual_size: int
    actual_size: int | None
    cluster_size: int | None
    backing_filename: str | None
    encrypted: bool
    corrupt: bool
    #: True when every allocated cluster of the top layer lives in the image file itself (no
    #: vmdk extent files, no qcow2 external data file), so map offsets can be checked against it.
    single_file: bool


@dataclass(frozen=True)
class MapEntry:
    """One entry of ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None

    @property
    def reads_as_zero(self) -> bool:
        return self.zero or not self.present


@dataclass(frozen=True)
class CheckResult:
    """The verdict of ``qemu-img check``: usable, or why not."""

    supported: bool
    corruptions: int
    leaks: int
    check_errors: int

    @property
    def ok(self) -> bool:
        # Leaked clusters waste space but never change what the guest reads.
        return self.corruptions == 0 and self.check_errors == 0


# --- validation --------------------------------------------------------------------------------


def require_format(fmt: str) -> str:
    """Return ``fmt`` if the appliance supports it, else raise ``InvalidInput``."""
    if fmt not in SUPPORTED_FORMATS:
        raise InvalidInput(
            f"unsupported disk format {fmt!r}; supported: {', '.join(SUPPORTED_FORMATS)}",
            format=fmt,
        )
    return fmt


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"qemu-img needs an absolute path, got {path!r}")
    return path


# --- argv builders (pure) ----------------------------------------------------------------------


def info_argv(path: str, fmt: str | None = None) -> list[str]:
    """``qemu-img info``; without ``fmt`` qemu probes the format."""
    argv = ["qemu-img", "info", "--output=json"]
    if fmt is not None:
        argv += ["-f", require_format(fmt)]
    return [*argv, _absolute(path)]


def map_argv(path: str, fmt: str) -> list[str]:
    return ["qemu-img", "map", "--output=json", "-f", require_format(fmt), _absolute(path)]


def check_argv(path: str, fmt: str) -> list[str]:
    return ["qemu-img", "check", "--output=json", "-f", require_format(fmt), _absolute(path)]


def convert_argv(raw_path: str, target: str, fmt: str, *, in_place: bool = False) -> list[str]:
    """Convert a raw file into ``target`` in ``fmt``, leaving zero runs as holes.

    ``in_place`` writes into an existing target (a block device) instead of creating one; qemu-img
    then writes zeros explicitly, since the device's old contents are unknown.
    """
    argv = ["qemu-img", "convert", "-f", "raw", "-O", require_format(fmt)]
    argv += ["-S", str(SPARSE_BYTES)]
    if in_place:
        argv.append("-n")
    else:
        argv += CREATE_OPTIONS.get(fmt, ())
    return [*argv, _absolute(raw_path), _absolute(target)]


# --- parsers (pure) ----------------------------------------------------------------------------


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"unreadable output of {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise SourceError(f"unexpected output of {what}: not a JSON object")
    return value


def parse_info(text: str) -> ImageInfo:
    data = _json_object(text, "qemu-img info")
    try:
        fmt = str(data["format"])
        virtual_size = int(data["virtual-size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"qemu-img info lacks {exc}") from exc
    specific = data.get("format-specific") or {}
    details = specific.get("data") or {}
    single_file = fmt in ("raw", "qcow2", "vdi", "vpc", "vhdx")
    if fmt == "qcow2" and details.get("data-file"):
        single_file = False
    if fmt == "vmdk":
        single_file = details.get("create-type") in ("monolithicSparse", "streamOptimized")
    return ImageInfo(
        format=fmt,
        virtual_size=virtual_size,
        actual_size=_optional_int(data.get("actual-size")),
        cluster_size=_optional_int(data.get("cluster-size")),
        backing_filename=data.get("full-backing-filename") or data.get("backing-filename"),
        encrypted=bool(data.get("encrypted")),
        corrupt=bool(details.get("corrupt")),
        single_file=single_file,
    )


def _optional_int(value: object) -> int | None:
    return int(value) if isinstance(value, int | str) else None


def _map_entry(item: object) -> MapEntry:
    if not isinstance(item, dict):
        raise SourceError("unexpected qemu-img map entry: not a JSON object")
    try:
        return MapEntry(
            start=int(item["start"]),
            length=int(item["length"]),
            depth=int(item.get("depth", 0)),
            # qemu before 6.0 has no "present"; then only "zero" tells a hole.
            present=bool(item.get("present", True)),
            zero=bool(item["zero"]),
            data=bool(item["data"]),
            offset=_optional_int(item.get("offset")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"qemu-img map entry lacks {exc}") from exc


def iter_map_entries(chunks: Iterable[str]) -> Iterator[MapEntry]:
    """Stream the entries of a ``qemu-img map --output=json`` array from chunks of its text.

    The array can hold millions of entries for a fragmented image, so it is decoded one object
    at a time instead of being loaded whole.
    """
    decoder = json.JSONDecoder()
    buffer = ""
    opened = closed = False
    for chunk in chunks:
        buffer += chunk
        pos = 0
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                pos += 1
            if pos == len(buffer):
                break
            char = buffer[pos]
            if not opened:
                if char != "[":
                    raise SourceError("unexpected output of qemu-img map: not a JSON array")
                opened = True
                pos += 1
                continue
            if char == "]":
                closed = True
                pos += 1
                continue
            if closed:
                raise SourceError("unexpected output of qemu-img map after the array")
            try:
                item, pos = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                break  # the object continues in the next chunk
            yield _map_entry(item)
        buffer = buffer[pos:]
    if buffer.strip() or not closed:
        raise SourceError("unreadable output of qemu-img map: malformed or cut short")


def parse_map(text: str) -> list[MapEntry]:
    return list(iter_map_entries([text]))


def parse_check(text: str, returncode: int) -> CheckResult:
    """Verdict from ``qemu-img check --output=json`` and its exit code."""
    if returncode == CHECK_UNSUPPORTED:
        return CheckResult(supported=False, corruptions=0, leaks=0, check_errors=0)
    if returncode == CHECK_ERRORS and not text.strip():
        return CheckResult(supported=True, corruptions=0, leaks=0, check_errors=1)
    data = _json_object(text, "qemu-img check")
    result = CheckResult(
        supported=True,
        corruptions=int(data.get("corruptions", 0)),
        leaks=int(data.get("leaks", 0)),
        check_errors=int(data.get("check-errors", 0)),
    )
    if returncode == CHECK_CORRUPT and not result.corruptions:
        return CheckResult(True, 1, result.leaks, result.check_errors)
    if returncode == CHECK_ERRORS and not result.check_errors:
        return CheckResult(True, result.corruptions, result.leaks, 1)
    return result


def extents_from_map(entries: Iterable[MapEntry], size: int) -> Iterator[Extent]:
    """Turn map entries into merged extents covering ``[0, size)``.

    Gaps (qemu never leaves any, but the map is input) are reported as data, the safe reading;
    entries reaching past ``size`` are cut at it.
    """
    run_start = 0
    run_zero: bool | None = None
    pos = 0
    for entry in entries:
        if entry.start < pos:
            raise SourceError(f"qemu-img map is out of order at offset {entry.start}")
        pieces = []
        if entry.start > pos:
            pieces.append((pos, min(entry.start, size), False))
        pieces.append((entry.start, min(entry.start + entry.length, size), entry.reads_as_zero))
        for start, end, zero in pieces:
            if end <= start:
                continue
            if run_zero is None:
                run_start, run_zero = start, zero
            elif zero != run_zero:
                yield Extent(run_start, start - run_start, run_zero)
                run_start, run_zero = start, zero
            pos = end
        if pos >= size:
            break
    if pos < size:
        if run_zero is None:
            run_start, run_zero = pos, False
        elif run_zero:
            yield Extent(run_start, pos - run_start, True)
            run_start, run_zero = pos, False
        pos = size
    if run_zero is not None:
        yield Extent(run_start, pos - run_start, run_zero)


def entry_past_end(entry: MapEntry, file_size: int, cluster_size: int) -> bool:
    """True when a top-layer data entry points a cluster or more past the end of its file.

    qemu reads such clusters as zeros, so a truncated image would otherwise back up as silently
    zeroed data; less than a cluster past the end is how a writer may legally leave its last one.
    """
    if entry.depth != 0 or not entry.data or entry.offset is None:
        return False
    return entry.offset + entry.length - file_size >= max(cluster_size, 512)


# --- runners -----------------------------------------------------------------------------------


def qemu_tool(name: str) -> str:
    """Absolute path of a qemu-utils tool, or ``InvalidInput`` naming the install step."""
    found = shutil.which(name)
    if found is None:
        raise InvalidInput(f"{name} is not installed; install it with `{INSTALL_HINT}`", tool=name)
    return found


def qemu_message(stderr: str, fallback: str) -> str:
    """qemu's own error text without its ``qemu-img:`` prefixes, one line per complaint."""
    lines = []
    for line in stderr.strip().splitlines():
        for prefix in ("qemu-img: ", "qemu-nbd: "):
            if line.startswith(prefix):
                line = line[len(prefix) :]
        if line.strip():
            lines.append(line.strip())
    return "; ".join(lines) or fallback


def run_qemu_img(
    argv: list[str], path: str, error: type[ApplianceError] = SourceError
) -> subprocess.CompletedProcess[str]:
    """Run a qemu-img argv from the builders; a failure is ``error`` with qemu's message."""
    result = _run(argv)
    if result.returncode != 0:
        raise error(
            qemu_message(result.stderr, f"{argv[1]} failed with status {result.returncode}"),
            path=path,
        )
    return result


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    tool = qemu_tool(argv[0])
    try:
        return subprocess.run(
            [tool, *argv[1:]], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as exc:  # removed between which() and exec
        raise InvalidInput(f"{argv[0]} is not installed; install it with `{INSTALL_HINT}`") from exc


def image_info(path: str, fmt: str | None = None) -> ImageInfo:
    path = os.path.abspath(path)
    return parse_info(run_qemu_img(info_argv(path, fmt), path).stdout)


def image_check(path: str, fmt: str) -> CheckResult:
    """Run ``qemu-img check``; corruption or a failed check is ``SourceError``."""
    path = os.path.abspath(path)
    result = _run(check_argv(path, fmt))
    if result.returncode == CHECK_ERRORS and not result.stdout.strip():
        # qemu-img could not even open or walk the image: its message says why.
        raise SourceError(
            qemu_message(result.stderr, f"qemu-img check failed on {path}"), path=path
        )
    verdict = parse_check(result.stdout, result.returncode)
    if not verdict.ok:
        detail = qemu_message(result.stderr, "")
        raise SourceError(
            f"disk image {path} is corrupt: qemu-img check found {verdict.corruptions} "
            f"corruption(s) and {verdict.check_errors} check error(s)"
            + (f" ({_first(detail)})" if detail else ""),
            path=path,
            corruptions=verdict.corruptions,
        )
    return verdict


def _first(message: str) -> str:
    first, _, rest = message.partition("; ")
    return first + ("; ..." if rest else "")


def map_extents(path: str, fmt: str, size: int, info: ImageInfo | None = None) -> Iterator[Extent]:
    """Stream the allocation map of an image as extents (see ``extents_from_map``).

    When ``info`` says the top layer is a single file, every data entry is checked against that
    file's size, so a truncated image fails instead of reading as zeros.
    """
    path = os.path.abspath(path)
    argv = map_argv(path, fmt)
    tool = qemu_tool(argv[0])
    file_size = os.stat(path).st_size
    cluster = (info.cluster_size if info else None) or 65536
    check_end = info is not None and info.single_file

    def checked(entries: Iterable[MapEntry]) -> Iterator[MapEntry]:
        for entry in entries:
            if check_end and entry_past_end(entry, file_size, cluster):
                raise SourceError(
                    f"disk image {path} is truncated: data at guest offset {entry.start} lies "
                    f"past the end of the file ({file_size} bytes)",
                    path=path,
                )
            yield entry

    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(
            [tool, *argv[1:]],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        stdout = proc.stdout
        assert stdout is not None
        try:
            chunks = iter(lambda: stdout.read(1 << 16), "")
            yield from extents_from_map(checked(iter_map_entries(chunks)), size)
        except SourceError:
            # Closing the pipe ends a qemu-img still writing (SIGPIPE) without any wait on it.
            stdout.close()
            if proc.wait() > 0:
                # Output cut short by qemu-img failing: its own message says why.
                stderr.seek(0)
                raise SourceError(
                    qemu_message(stderr.read(), "qemu-img map failed"), path=path
                ) from None
            raise
        finally:
            if proc.poll() is None:
                proc.kill()  # the consumer stopped early: stop the map we started
            stdout.close()
            proc.wait()
        if proc.returncode != 0:
            stderr.seek(0)
            raise SourceError(qemu_message(stderr.read(), "qemu-img map failed"), path=path)


def convert_raw(raw_path: str, target: str, fmt: str, *, in_place: bool = False) -> None:
    """Write the raw file ``raw_path`` into ``target`` as ``fmt`` (see ``convert_argv``).

    A failure here is about the target (space, permissions, a device too small), not about a
    backup source, so it is a plain ``ApplianceError`` with qemu-img's message.
    """
    raw_path, target = os.path.abspath(raw_path), os.path.abspath(target)
    argv = convert_argv(raw_path, target, fmt, in_place=in_place)
    run_qemu_img(argv, target, ApplianceError)
