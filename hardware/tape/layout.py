"""The tape layout: what a cartridge of a media set holds, encoded and decoded by pure functions.

A cartridge (``docs/format.md``, "Tape") is a sequence of tape files, each ended by a filemark:

1. the **label** (one block): medium label id, barcode, pool, media set id, sequence number of the
   cartridge in the set, store id, when it was labelled;
2. **data files**: a header block listing the objects of the file (name, size, SHA-256), then each
   object's bytes exactly as the store holds them (packs, index files, manifests, ``config``,
   ``keys/*``), each object starting on a new block and cut into :data:`BLOCK_SIZE` blocks (the
   last one short): the drive runs in variable-block mode, so ``dd bs=1M`` reads them back;
3. the **set catalog**, the last file of each write session (and of a cartridge that filled up):
   every object of the set so far with where it lies (sequence, file number, first logical block,
   block count) and every point of the set with the objects it needs. A later session appends
   after it and ends with a newer one (a higher ``generation``): the newest catalog on a tape is
   the one that counts, and the previous one stays until a newer one is on tape, so a session
   killed midway never leaves a tape without a catalog.

The label, the header and the catalog are *frames*: :data:`FRAME_MAGIC`, a kind byte, a version
byte, two reserved bytes, the length of the JSON payload (4 bytes, big endian), the SHA-256 of the
payload, then the payload (UTF-8 JSON). A label and a header fit in one block; a catalog may span
several blocks (the frame is the concatenation of the file's blocks). Nothing here is secret
beyond what the store's own object names show: the objects are the store's encrypted objects.

Frozen like the store format: never renumber a kind or reuse a field's meaning.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from appliance.errors import IntegrityError, UnsupportedFormat
from appliance.store.backend import check_name

#: Tape layout version written in every frame.
TAPE_FORMAT_VERSION: Final = 1
#: The largest block written (variable-block mode: the last block of an object is shorter).
BLOCK_SIZE: Final = 256 * 1024
FRAME_MAGIC: Final = b"APLTAPE\x00"
#: frame = magic(8) | kind(1) | version(1) | reserved(2) | length(4) | sha256(32) | payload
FRAME_HEADER: Final = struct.Struct(">8sBBHI32s")
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size  # 48
KIND_LABEL: Final = ord("L")
KIND_HEADER: Final = ord("H")
KIND_CATALOG: Final = ord("C")
_KIND_NAMES = {KIND_LABEL: "label", KIND_HEADER: "data file header", KIND_CATALOG: "set catalog"}
#: The most objects one data file lists (its header must fit one block).
MAX_OBJECTS_PER_FILE: Final = 600


# --- frames -----------------------------------------------------------------------------------


def encode_frame(kind: int, document: Mapping[str, Any]) -> bytes:
    """A frame of ``kind`` holding ``document`` as JSON."""
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    header = FRAME_HEADER.pack(
        FRAME_MAGIC, kind, TAPE_FORMAT_VERSION, 0, len(payload), hashlib.sha256(payload).digest()
    )
    return header + payload


def frame_kind(data: bytes) -> int | None:
    """The kind of the frame ``data`` starts with, or None when it is not a frame of ours."""
    if len(data) < FRAME_HEADER_SIZE or data[:8] != FRAME_MAGIC:
        return None
    return data[8]


def decode_frame(data: bytes, kind: int) -> dict[str, Any]:
    """The JSON document of a frame of ``kind``; :class:`IntegrityError` for anything else."""
    what = _KIND_NAMES.get(kind, "frame")
    if len(data) < FRAME_HEADER_SIZE or data[:8] != FRAME_MAGIC:
        raise IntegrityError(f"this is not a tape {what} written by the appliance")
    _magic, found, version, _reserved, length, digest = FRAME_HEADER.unpack_from(data)
    if found != kind:
        raise IntegrityError(
            f"expected a tape {what}, found a {_KIND_NAMES.get(found, f'frame of kind {found}')}"
        )
    if version != TAPE_FORMAT_VERSION:
        raise UnsupportedFormat(f"tape layout version {version} is not supported by this version")
    payload = data[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length]
    if len(payload) != length:
        raise IntegrityError(f"the tape {what} is cut short ({len(payload)} of {length} bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise IntegrityError(f"the tape {what} is damaged (its checksum does not match)")
    try:
        document = json.loads(payload)
    except ValueError as exc:
        raise IntegrityError(f"the tape {what} is damaged: {exc}") from exc
    if not isinstance(document, dict):
        raise IntegrityError(f"the tape {what} is damaged: not a JSON object")
    return document


def split_blocks(data: bytes | memoryview, size: int = BLOCK_SIZE) -> Iterator[memoryview]:
    """``data`` cut into blocks of ``size`` bytes, the last one shorter (none for no bytes)."""
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start : start + size]


def block_count(size: int, block: int = BLOCK_SIZE) -> int:
    """How many blocks an object of ``size`` bytes takes."""
    return -(-size // block)


# --- the label --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapeLabel:
    """The first file of every cartridge the appliance wrote."""

    label_id: str
    barcode: str
    pool: str
    media_set_id: str
    sequence: int
    store_id: str
    labelled_at: str  # ISO 8601 UTC

    def encode(self) -> bytes:
        block = encode_frame(KIND_LABEL, {"format": TAPE_FORMAT_VERSION, **asdict(self)})
        if len(block) > BLOCK_SIZE:
            raise ValueError("a tape label must fit one block")
        return block

    @classmethod
    def decode(cls, block: bytes) -> TapeLabel:
        doc = decode_frame(block, KIND_LABEL)
        try:
            return cls(
                label_id=str(doc["label_id"]),
                barcode=str(doc["barcode"]),
                pool=str(doc["pool"]),
                media_set_id=str(doc["media_set_id"]),
                sequence=int(doc["sequence"]),
                store_id=str(doc["store_id"]),
                labelled_at=str(doc["labelled_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"the tape label lacks a field: {exc}") from exc


# --- data file headers ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    size: int
    sha256: str


def encode_header(media_set_id: str, sequence: int, entries: Sequence[HeaderEntry]) -> bytes:
    """The first block of a data file, listing its objects in the order they follow."""
    if len(entries) > MAX_OBJECTS_PER_FILE:
        raise ValueError(f"a data file lists at most {MAX_OBJECTS_PER_FILE} objects")
    block = encode_frame(
        KIND_HEADER,
        {
            "format": TAPE_FORMAT_VERSION,
            "media_set_id": media_set_id,
            "sequence": sequence,
            "objects": [asdict(e) for e in entries],
        },
    )
    if len(block) > BLOCK_SIZE:
        raise ValueError("a data file header must fit one block")
    return block


def header_fits(entries: Sequence[HeaderEntry]) -> bool:
    """Whether a data file header listing ``entries`` fits one block."""
    if len(entries) > MAX_OBJECTS_PER_FILE:
        return False
    try:
        encode_header("0" * 32, 1, entries)
    except ValueError:
        return False
    return True


def decode_header(block: bytes) -> list[HeaderEntry]:
    doc = decode_frame(block, KIND_HEADER)
    try:
        return [
            HeaderEntry(check_name(str(o["name"])), int(o["size"]), str(o["sha256"]))
            for o in doc["objects"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"the data file header is damaged: {exc}") from exc


# --- the set catalog --------------------------------------------------------------------------


@dataclass(frozen=True)
class TapeObject:
    """Where one object of the set lies: cartridge (sequence), tape file, first logical block
    (blocks and filemarks from BOT, as ``Drive.position`` counts) and how many blocks."""

    name: str
    size: int
    sha256: str
    sequence: int
    file: int
    block: int
    blocks: int


@dataclass(frozen=True)
class MediumEntry:
    sequence: int
    label_id: str
    barcode: str


@dataclass(frozen=True)
class SetCatalog:
    """Everything a media set holds so far; the newest one (highest ``generation``) wins."""

    media_set_id: str
    store_id: str
    pool: str
    generation: int
    written_at: str
    media: tuple[MediumEntry, ...] = ()
    objects: tuple[TapeObject, ...] = ()
    #: point id -> the names of every object the point needs (config and keys included).
    points: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: The sequence of the tape this catalog was written on (0: not written yet).
    written_on: int = 0

    def by_name(self) -> dict[str, TapeObject]:
        """The newest place of each object (an object written again lies where it was last)."""
        return {o.name: o for o in self.objects}

    def barcode_of(self, sequence: int) -> str:
        for medium in self.media:
            if medium.sequence == sequence:
                return medium.barcode
        raise IntegrityError(f"the set catalog names no cartridge of sequence {sequence}")

    def to_document(self) -> dict[str, Any]:
        return {
            "format": TAPE_FORMAT_VERSION,
            "media_set_id": self.media_set_id,
            "store_id": self.store_id,
            "pool": self.pool,
            "generation": self.generation,
            "written_at": self.written_at,
            "media": [asdict(m) for m in self.media],
            "objects": [
                [o.name, o.size, o.sha256, o.sequence, o.file, o.block, o.blocks]
                for o in self.objects
            ],
            "points": {p: list(names) for p, names in sorted(self.points.items())},
            "written_on": self.written_on,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> SetCatalog:
        try:
            return cls(
                media_set_id=str(doc["media_set_id"]),
                store_id=str(doc["store_id"]),
                pool=str(doc["pool"]),
                generation=int(doc["generation"]),
                written_at=str(doc["written_at"]),
                media=tuple(
                    MediumEntry(int(m["sequence"]), str(m["label_id"]), str(m["barcode"]))
                    for m in doc["media"]
                ),
                objects=tuple(
                    TapeObject(check_name(str(n)), int(s), str(h), int(q), int(f), int(b), int(c))
                    for n, s, h, q, f, b, c in doc["objects"]
                ),
                points={
                    str(p): tuple(check_name(str(n)) for n in names)
                    for p, names in doc["points"].items()
                },
                written_on=int(doc.get("written_on", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"the set catalog is damaged: {exc}") from exc

    def encode(self) -> bytes:
        """The catalog frame (cut into blocks with :func:`split_blocks` to write it)."""
        return encode_frame(KIND_CATALOG, self.to_document())

    @classmethod
    def decode(cls, data: bytes) -> SetCatalog:
        return cls.from_document(decode_frame(data, KIND_CATALOG))


def plan_reads(catalog: SetCatalog, names: Sequence[str]) -> list[TapeObject]:
    """The objects ``names`` in the order a reader takes them: by cartridge, then by position,
    so each cartridge is loaded once and read forward. :class:`IntegrityError` names an object
    the set does not hold."""
    where = catalog.by_name()
    missing = [n for n in names if n not in where]
    if missing:
        raise IntegrityError(
            f"media set {catalog.media_set_id} does not hold {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unique = {where[n].name: where[n] for n in names}
    return sorted(unique.values(), key=lambda o: (o.sequence, o.block))


def count_seeks(reads: Sequence[TapeObject]) -> int:
    """How many locates a reader of ``reads`` (in this order) makes: one per cartridge, plus
    one for each object that does not start where the previous one ended."""
    seeks = 0
    at: tuple[int, int] | None = None
    for o in reads:
        if at != (o.sequence, o.block):
            seeks += 1
        at = (o.sequence, o.block + o.blocks)
    return seeks
