"""Container format of a disk image from its magic bytes, without any QEMU tool.

``classify_image`` is a pure function over the first ``HEAD_BYTES`` of an image and its last
``TAIL_BYTES`` (the footer that fixed VHDs and DMGs keep at the end). The names it returns are
qemu's format names, so a recognised container can be handed to the ``appliance.disk_formats``
plug-in as is; anything it does not recognise is ``"raw"``. Raw disks are therefore backed up with
no plug-in and no qemu-img installed.

Invariants:

- Every magic number the appliance recognises lives in this module.
- Detection trusts the image's header (and footer): a raw disk whose guest wrote, say, a qcow2
  header at sector 0 is taken for qcow2. Callers that know the format pass it instead.
- Two cases deliberately differ from ``qemu-img info``'s probe. A fixed VHD (only a footer) is
  "vpc", not "raw": read as raw, its 512-byte footer would become part of the guest's disk. A DMG
  is "dmg" whatever its file name (qemu also wants a ``.dmg`` suffix), so it is refused rather
  than backed up as raw bytes of a container.
"""

from __future__ import annotations

import struct

#: Bytes read from the start of an image: enough for every header magic below.
HEAD_BYTES = 4096
#: Bytes read from the end of an image: one VHD footer or DMG "koly" trailer.
TAIL_BYTES = 512

#: (magic at offset 0, qemu format name), checked in order.
HEADER_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"QED\x00", "qed"),
    (b"KDMV", "vmdk"),  # sparse extent (monolithicSparse, streamOptimized)
    (b"COWD", "vmdk"),  # VMware 3 sparse extent
    (b"# Disk DescriptorFile", "vmdk"),  # text descriptor (monolithicFlat, split extents)
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),  # dynamic VHD: a copy of the footer opens the file
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
)
QCOW_MAGIC = b"QFI\xfb"
#: VDI's signature: little-endian u32 at offset 0x40 of the pre-header.
VDI_SIGNATURE_OFFSET = 0x40
VDI_SIGNATURE = 0xBEDA107F
#: Footers at the start of the last ``TAIL_BYTES``: fixed VHD, DMG trailer.
FOOTER_MAGICS: tuple[tuple[bytes, str], ...] = ((b"conectix", "vpc"), (b"koly", "dmg"))


def classify_image(head: bytes, tail: bytes) -> str:
    """qemu's name for the container whose first bytes are ``head``; "raw" when none matches.

    ``head`` is the start of the image (``HEAD_BYTES`` or the whole of a shorter one); ``tail``
    is its last ``TAIL_BYTES`` bytes, or empty when the image is shorter than that.
    """
    if head.startswith(QCOW_MAGIC) and len(head) >= 8:
        (version,) = struct.unpack_from(">I", head, 4)
        # Versions 2 and 3 are qcow2; an unknown version goes to qemu's qcow2 driver, which
        # refuses it loudly instead of the container being backed up as raw bytes.
        return "qcow" if version == 1 else "qcow2"
    for magic, name in HEADER_MAGICS:
        if head.startswith(magic):
            return name
    if len(head) >= VDI_SIGNATURE_OFFSET + 4:
        (signature,) = struct.unpack_from("<I", head, VDI_SIGNATURE_OFFSET)
        if signature == VDI_SIGNATURE:
            return "vdi"
    if len(tail) == TAIL_BYTES:
        for magic, name in FOOTER_MAGICS:
            if tail.startswith(magic):
                return name
    return "raw"
