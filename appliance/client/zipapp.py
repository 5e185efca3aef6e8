"""The client as one file: a zipapp of :mod:`appliance.client` and the tree walker.

It runs with ``python3 appliance-client.pyz`` on any Linux host with Python 3.11+ and the four
libraries it needs (``pip install httpx zstandard blake3 pyfastcdc``); nothing of the appliance
service is in it. The file is rebuilt only when a source file is newer than it.
"""

from __future__ import annotations

import io
import os
import zipfile

import appliance

#: Module files of the package ``appliance`` that the client needs, relative to it.
FILES = (
    "__init__.py",
    "client/__init__.py",
    "client/backup.py",
    "client/blockdev.py",
    "client/cli.py",
    "client/connection.py",
    "client/restore.py",
    "client/tls.py",
    "client/wire.py",
    "sources/__init__.py",
    "sources/tree_source.py",
)
MAIN = b"import sys\nfrom appliance.client.cli import main\nsys.exit(main())\n"


def build_zipapp(target: str) -> str:
    package = os.path.dirname(appliance.__file__)
    sources = [os.path.join(package, name) for name in FILES]
    newest = max(os.stat(p).st_mtime for p in sources)
    if os.path.exists(target) and os.stat(target).st_mtime >= newest:
        return target
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("__main__.py", MAIN)
        for name, path in zip(FILES, sources, strict=True):
            archive.write(path, f"appliance/{name}")
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        f.write(buffer.getvalue())
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target
