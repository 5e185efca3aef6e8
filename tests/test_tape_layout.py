"""The tape layout's pure encode/decode (hardware.tape.layout), tested on bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from appliance.errors import IntegrityError, UnsupportedFormat
from hardware.tape import layout
from hardware.tape.drive import EndOfData
from hardware.tape.layout import (
    BLOCK_SIZE,
    FRAME_HEADER_SIZE,
    HeaderEntry,
    MediumEntry,
    SetCatalog,
    TapeLabel,
    TapeObject,
    block_count,
    count_seeks,
    decode_header,
    encode_header,
    header_fits,
    plan_reads,
    split_blocks,
)
from hardware.tape.virtual import VirtualCartridge, VirtualDrive
from hardware.tape.writer import SetWriter, write_label

LABEL = TapeLabel("l1", "TAPE01L6", "weekly", "set1", 1, "0123456789abcdef", "2026-12-05T00:00:00")


def _catalog() -> SetCatalog:
    objects = (
        TapeObject("config", 10, "aa", 1, 1, 3, 1),
        TapeObject("data/00/" + "0" * 64, BLOCK_SIZE + 1, "bb", 1, 1, 4, 2),
        TapeObject("manifests/0123456789abcdef", 5, "cc", 2, 1, 3, 1),
        TapeObject("index/" + "1" * 64, 7, "dd", 1, 2, 8, 1),
    )
    return SetCatalog(
        "set1",
        "0123456789abcdef",
        "weekly",
        3,
        "2026-12-05T00:00:00",
        (MediumEntry(1, "l1", "TAPE01L6"), MediumEntry(2, "l2", "TAPE02L6")),
        objects,
        {"0123456789abcdef": ("config", "manifests/0123456789abcdef")},
    )


def test_label_round_trip_and_fits_one_block() -> None:
    block = LABEL.encode()
    assert len(block) <= BLOCK_SIZE
    assert block[:8] == layout.FRAME_MAGIC and block[8] == ord("L")
    assert TapeLabel.decode(block) == LABEL
    # The payload is plain JSON after the 48-byte frame header (dd | tail -c +49 reads it).
    assert json.loads(block[FRAME_HEADER_SIZE:])["barcode"] == "TAPE01L6"


def test_damaged_frames_are_refused_in_words() -> None:
    block = bytearray(LABEL.encode())
    block[-3] ^= 0xFF
    with pytest.raises(IntegrityError, match="checksum"):
        TapeLabel.decode(bytes(block))
    with pytest.raises(IntegrityError, match="not a tape label"):
        TapeLabel.decode(b"\0" * 100)
    with pytest.raises(IntegrityError, match="expected a tape label, found a set catalog"):
        TapeLabel.decode(_catalog().encode())
    with pytest.raises(IntegrityError, match="cut short"):
        TapeLabel.decode(LABEL.encode()[:-1])
    newer = bytearray(LABEL.encode())
    newer[9] = 2
    with pytest.raises(UnsupportedFormat, match="version 2"):
        TapeLabel.decode(bytes(newer))


def test_catalog_round_trip_and_newest_place() -> None:
    catalog = _catalog()
    assert SetCatalog.decode(catalog.encode()) == catalog
    moved = TapeObject("config", 10, "aa", 2, 3, 9, 1)
    again = SetCatalog.decode(
        SetCatalog(**{**catalog.__dict__, "objects": (*catalog.objects, moved)}).encode()
    )
    assert again.by_name()["config"] == moved
    assert catalog.barcode_of(2) == "TAPE02L6"
    with pytest.raises(IntegrityError, match="sequence 7"):
        catalog.barcode_of(7)


def test_catalog_refuses_bad_names() -> None:
    doc = _catalog().to_document()
    doc["objects"][0][0] = "../etc/passwd"
    with pytest.raises(Exception, match="invalid object name"):
        SetCatalog.from_document(doc)


def test_header_round_trip_and_limits() -> None:
    entries = [HeaderEntry(f"index/{i:064x}", i, "") for i in range(layout.MAX_OBJECTS_PER_FILE)]
    block = encode_header("set1", 1, entries)
    assert len(block) <= BLOCK_SIZE
    assert decode_header(block) == entries
    with pytest.raises(ValueError, match="at most"):
        encode_header("set1", 1, [*entries, entries[0]])
    assert header_fits(entries) and not header_fits([*entries, entries[0]])
    long = [HeaderEntry("keys/" + "k" * 500, 1, "")] * 600
    assert not header_fits(long) and header_fits(long[:300])


def test_blocks_and_read_plan() -> None:
    data = bytes(range(256)) * 2049  # a little over 2 blocks
    blocks = [bytes(b) for b in split_blocks(data)]
    assert [len(b) for b in blocks] == [BLOCK_SIZE, BLOCK_SIZE, len(data) - 2 * BLOCK_SIZE]
    assert b"".join(blocks) == data
    assert block_count(len(data)) == 3 and block_count(0) == 0 and list(split_blocks(b"")) == []
    catalog = _catalog()
    plan = plan_reads(catalog, ["manifests/0123456789abcdef", "index/" + "1" * 64, "config"])
    assert [(o.sequence, o.block) for o in plan] == [(1, 3), (1, 8), (2, 3)]
    # config ends at block 4, where the next read does not start: 3 locates in all.
    assert count_seeks(plan) == 3
    both = plan_reads(catalog, ["config", "data/00/" + "0" * 64])
    assert count_seeks(both) == 1  # one after the other: a single locate
    with pytest.raises(IntegrityError, match="does not hold"):
        plan_reads(catalog, ["keys/0000000000000000"])


def test_frame_checksum_is_sha256_of_payload() -> None:
    block = LABEL.encode()
    payload = block[FRAME_HEADER_SIZE:]
    assert block[16:48] == hashlib.sha256(payload).digest()
    assert int.from_bytes(block[12:16], "big") == len(payload)


def test_docs_recipe_reads_a_written_tape(tmp_path: Path) -> None:
    """docs/format.md "Restoring with mt and dd alone", step by step on a tape the writer made:
    dd of every tape file (one read per block), the last 'C' file's JSON after byte 48, then
    each object by `mt seek BLOCK` and `dd count=BLOCKS`, checked by its SHA-256."""
    path = tmp_path / "DOC001.tape"
    VirtualCartridge.create(path, capacity=8 << 20, early_warning=1 << 16, barcode="DOC001")
    drive = VirtualDrive("doc")
    drive.load(path)
    write_label(drive, LABEL)
    objects = {"config": b"{}", "data/ab/" + "a" * 64: bytes(range(256)) * 3000, "keys/k": b"k"}
    writer = SetWriter(drive, LABEL, SetCatalog("set1", LABEL.store_id, "weekly", 0, ""), _none)
    names = list(objects)
    writer.write_objects(names, [len(objects[n]) for n in names], objects.__getitem__)
    writer.add_point("p1", names)
    writer.finish()
    drive.rewind()
    files: list[bytes] = []
    while True:  # while dd if=$T bs=256k of=f.$n && [ -s f.$n ]
        blocks = []
        try:
            while block := drive.read_block(BLOCK_SIZE):
                blocks.append(block)
        except EndOfData:
            pass
        if not blocks:
            break
        files.append(b"".join(blocks))
    assert json.loads(files[0][48:])["barcode"] == LABEL.barcode
    catalog = json.loads([f for f in files if f[8:9] == b"C"][-1][48:])
    for name, size, sha, _seq, _file, block, blocks in catalog["objects"]:
        drive.locate(block)  # mt seek BLOCK
        data = b"".join(drive.read_block(BLOCK_SIZE) for _ in range(blocks))
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
        assert data == objects[name]
    assert catalog["points"] == {"p1": names}
    drive.close()


def _none(sequence: int) -> tuple[VirtualDrive, TapeLabel]:
    raise AssertionError("one tape is enough")
