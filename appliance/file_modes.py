"""Files at rest are the appliance's alone: the data directory is 0700, everything in it 0600.

The catalog holds password hashes and token digests, the store's key file and the secrets folder
hold what unlocks every backup: no local user may read them, whatever the umask of the shell that
first started the appliance. Processes of the appliance (the service, the CLI) run with umask
0077, so what they create is private; :func:`tighten_data_dir` fixes what an older version or
another umask left readable (run at every service start). It never follows a symlink and leaves
the restore area's contents alone: restored files keep the modes their point recorded.
"""

from __future__ import annotations

import os
import stat

#: The umask of every appliance process.
PRIVATE_UMASK = 0o077
#: Folders of the data directory whose contents keep their own modes.
KEEP_MODES = ("restores",)


def private_umask() -> None:
    """Make every file this process creates from now on private (0600 / 0700)."""
    os.umask(PRIVATE_UMASK)


def tighten_data_dir(data_dir: str) -> int:
    """Take group and other permissions away from the data directory and everything in it
    (except the restore area's contents); returns how many entries were changed."""
    changed = 0
    for directory, dirs, files in os.walk(data_dir, topdown=True, followlinks=False):
        if directory == data_dir:
            dirs[:] = [d for d in dirs if d not in KEEP_MODES]
        for name in (directory, *(os.path.join(directory, n) for n in (*dirs, *files))):
            changed += _tighten(name)
    for keep in KEEP_MODES:
        path = os.path.join(data_dir, keep)
        if os.path.isdir(path) and not os.path.islink(path):
            changed += _tighten(path)  # the folder itself, not what was restored into it
    return changed


def _tighten(path: str) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return 0
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700, follow_symlinks=False)
    return 1
