"""Safe extraction of a ``package.tar``: one top folder of plain files and folders, nothing else.

Every member is checked before a single byte is written, and the whole archive is refused on
the first bad member with one line naming it: an absolute name, a ``..`` component, a member
outside the one top folder, a symlink or hard link, a device file, a fifo, a duplicate name.
Extraction then goes into a temporary folder beside the destination, and only a complete,
checked tree is renamed into place: a refused or interrupted extraction leaves nothing that
looks like a package, and nothing is ever written outside the destination's parent folder.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from stages.lib.runtime.errors import PackageError

_KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a fifo"}


# tarfile.FilterError exists from 3.11.4 / 3.10.12 (PEP 706); a stand-in that never matches before
_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", type("_NoFilterError", (Exception,), {}))


def _refuse(archive: Path, member: str, why: str) -> PackageError:
    return PackageError(f"{archive.name}: refused member {member!r}: {why}; a package holds only plain files "
                        f"and folders under one top folder")


def check_members(archive: Path, members: list[tarfile.TarInfo]) -> str:
    """The archive's top folder name, or PackageError naming the first member that is not safe."""
    top: str | None = None
    seen: set[str] = set()
    for m in members:
        name = m.name
        if "\x00" in name or "\\" in name:
            raise _refuse(archive, name, "odd characters in the name")
        if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
            raise _refuse(archive, name, "an absolute path")
        parts = [p for p in PurePosixPath(name).parts if p != "."]
        if ".." in parts:
            raise _refuse(archive, name, "a '..' component (it would land outside the package)")
        if not parts:
            raise _refuse(archive, name, "an empty name")
        if not (m.isreg() or m.isdir()):
            raise _refuse(archive, name, _KINDS.get(m.type, f"member type {m.type!r}"))
        if top is None:
            top = parts[0]
        if parts[0] != top or (len(parts) == 1 and not m.isdir()):
            raise _refuse(archive, name, f"outside the top folder {top!r}")
        key = "/".join(parts)
        if key in seen and not m.isdir():
            raise _refuse(archive, name, "a second member of the same name (it would overwrite the first)")
        seen.add(key)
    if top is None:
        raise PackageError(f"{archive.name}: an empty archive (expected one top folder <name>-<target>/)")
    return top


def extract(archive: str | Path, dest_dir: str | Path) -> Path:
    """Extract ``archive`` into ``dest_dir/<top folder>`` and return that path.

    ``dest_dir`` is created if needed; ``dest_dir/<top>`` must not exist yet (PackageError).
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise PackageError(f"{archive}: not a readable tar archive ({e})") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PackageError(f"{archive}: truncated or corrupt tar archive ({e})") from None
        top = check_members(archive, members)
        final = dest_dir / top
        if final.exists():
            raise PackageError(f"{final} already exists: remove it or extract elsewhere")
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{top}.partial-", dir=dest_dir))
        try:
            # Both layers on purpose. Ours above refuses the whole archive before anything is
            # written and names the member in one line; tarfile's "data" filter (3.11.4+, PEP 706)
            # raises only when it reaches a bad member, after the members before it were written,
            # and it accepts in-tree links, which a package never has. The filter stays as defence
            # in depth: it re-checks each path as tarfile resolves it at write time, and it clears
            # setuid/setgid/sticky and group/other-write mode bits, which our check does not look at.
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4: our checks above are the only guard
                tf.extractall(tmp, members=members)
            _check_tree(tmp, archive)
            os.rename(tmp / top, final)
        except _FILTER_ERROR as e:
            raise PackageError(f"{archive.name}: refused member: {e}") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PackageError(f"{archive}: extraction failed ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_tree(root: Path, archive: Path) -> None:
    """After extraction: nothing but plain files and folders (a last look, links included)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in (*dirnames, *filenames):
            p = Path(dirpath) / n
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise PackageError(f"{archive.name}: refused member {str(p.relative_to(root))!r}: not a plain "
                                   f"file or folder after extraction")
