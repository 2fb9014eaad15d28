"""Safe extraction of a downloaded tar archive (`medtricks data fetch` of a set published as a repository archive).

An archive from the network is untrusted input: a member may point outside the destination (`../x`, `/etc/x`), be a
link that a later member writes through, or the archive may be a "bomb" that fills the disk. Each member is checked
before it is written (regular files and folders only, a relative path without `..`) and the running count and
declared size are bounded; tarfile's own `filter="data"` (PEP 706) guards the same again and drops permissions and
owners that do not belong on a data set.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from medtricks.errors import DataError

logger = logging.getLogger(__name__)

# Bounds generous for the COVID-19 image data collection (about 1 GB, a few thousand files at the pinned commit),
# tight enough that a hostile archive cannot fill the disk of a workstation.
MAX_EXTRACT_BYTES = 5 * 1024**3
MAX_EXTRACT_MEMBERS = 50_000
# A compressed container (an .npz member, a deflated DICOM) that inflates past RATIO_FROM_BYTES may not inflate more
# than MAX_RATIO-fold: real pixels compress 1.5-10x, zeros 1000x (a zip bomb)
MAX_RATIO = 200
RATIO_FROM_BYTES = 64 * 1024**2


def _refusal(member: tarfile.TarInfo) -> str | None:
    """Why `member` may not be extracted, or None."""
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return "an absolute path"
    if ".." in path.parts:
        return "a path that leaves the folder ('..')"
    if member.issym() or member.islnk():
        return f"a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "neither a file nor a folder (a device, a pipe, ...)"
    return None


def extract_tar(archive: Path, dest: Path, max_bytes: int | None = None,
                max_members: int | None = None) -> tuple[int, int]:
    """Extract the tar archive (gzip or plain) `archive` into the existing folder `dest`, refusing anything unsafe.

    Args:
        archive: the downloaded file.
        dest: an empty folder; on an error it holds a partial extraction, which the caller removes.
        max_bytes: the most bytes the members may declare in total (default MAX_EXTRACT_BYTES).
        max_members: the most members (default MAX_EXTRACT_MEMBERS).

    Returns:
        The number of files and their total size in bytes.

    Raises:
        DataError: a member that is a link, a device or has a path leaving `dest` (naming it), more members or bytes
            than the bounds, or an archive that cannot be read (truncated, not a tar file).
    """
    max_bytes = MAX_EXTRACT_BYTES if max_bytes is None else max_bytes
    max_members = MAX_EXTRACT_MEMBERS if max_members is None else max_members
    count = files = size = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one header at a time: a bomb is stopped before the rest is read
                count += 1
                if count > max_members:
                    raise DataError(f"{archive}: the archive holds more than {max_members:,} members, the bound "
                                    f"(archive.MAX_EXTRACT_MEMBERS); refused as unsafe.")
                why = _refusal(member)
                if why is not None:
                    raise DataError(f"{archive}: member {member.name!r} is {why}; the archive is refused as unsafe "
                                    f"and nothing was installed.")
                size += member.size
                if size > max_bytes:
                    raise DataError(f"{archive}: the archive's files add up to more than {max_bytes:,} bytes, the "
                                    f"bound (archive.MAX_EXTRACT_BYTES); refused as unsafe.")
                tar.extract(member, dest, filter="data")
                files += member.isfile()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # FilterError is a TarError
        raise DataError(f"{archive}: cannot extract it ({exc}); nothing was installed.") from exc
    logger.debug("%s: %d files, %d bytes extracted into %s", archive, files, size, dest)
    return files, size
