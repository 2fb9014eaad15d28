"""Writing files without losing any: atomic writes, the names of a run directory's own files, and the rule every
option that writes a file follows (`--out`, `--json`, `--save-images`).

- Atomic: each file is written to a temporary file in its folder and renamed over the target, so a killed process
  leaves the old file or the new one, never half of one; a full disk or a missing permission is a clear error that
  names the file and keeps the old version.
- A new folder of files (`new_folder`) is filled under a hidden temporary name beside it and renamed into place
  when complete, so an interrupted command leaves no half-filled folder that a rerun would refuse or misread.
- An option's target (`check_output`, checked before the command does its work): its folder exists and is writable;
  an existing file is refused unless the user said `--overwrite`; a run directory's own files (RUN_FILES, and
  anything under its plots/, attacks/ and corruptions/ folders) are refused always: only finetune writes them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from medtricks.errors import MedtricksError, short

MODEL_FILE, MODEL_JSON, RECIPE_FILE, METRICS_FILE, REPORT_FILE, RESUME_FILE = (
    "model.safetensors", "model.json", "recipe.yaml", "metrics.jsonl", "report.json", "resume.safetensors")
RUN_FILES = (MODEL_FILE, MODEL_JSON, RECIPE_FILE, METRICS_FILE, REPORT_FILE, RESUME_FILE, "plots", "attacks",
             "corruptions")


class OutputError(MedtricksError):
    """A file cannot be written where asked: it exists, it belongs to a run, or its folder is missing or read-only."""


class DiskFullError(OutputError):
    """The disk filled (or a quota was reached) while a file was written; the previous version is kept."""


def printable(value) -> str:
    """str(value) as valid UTF-8 text: a file name's undecodable bytes (which Python holds as surrogates) as \\xNN,
    any other lone surrogate as \\uNNNN. Fonts, CSV and JSON writers refuse surrogates."""
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def cache_root() -> Path:
    """$MEDTRICKS_CACHE, else ~/.cache/medtricks: the folder of the weights/, images/ and data/ caches."""
    return Path(os.environ.get("MEDTRICKS_CACHE") or Path.home() / ".cache" / "medtricks")


def atomic_write(path: Path, write: Callable[[Path], None], replace: bool = True) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path` (creating the folder).

    `replace=False` (an option's target without --overwrite) publishes the file only if no file of that name
    appeared since check_output looked, e.g. written by a second command given the same --json at the same time.

    Raises:
        OutputError: the folder cannot be made or written (naming the file and the reason), or, with
            `replace=False`, the file exists by now; the old file stays.
    """
    path = Path(path)
    tmp = None
    try:
        if path.is_symlink():  # replace the file the link names (the one check_output checked), not the link
            path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        # the name is cut so that a legal long file name still leaves room for the temporary one's affixes
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: the disk is full (or over quota) while writing it; the previous version of "
                              f"the file, if any, is kept. Free some space and run the command again.") from exc
        raise OutputError(f"{path}: cannot write it ({exc.strerror or exc}). Choose a writable place (a missing "
                          f"folder, a file where a folder is expected, or a read-only disk cause this).") from exc


def _publish_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if that name is free: a hard link fails atomically where a rename would
    replace (file systems without hard links fall back to a check right before the rename)."""
    try:
        os.link(tmp, path)
        tmp.unlink()
        return
    except FileExistsError:
        taken = True
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        taken = os.path.lexists(path)
    if taken:
        raise OutputError(f"{path}: a file of that name appeared while the command ran (another command writing the "
                          f"same file?); it is kept as it is. Run the command again with another name, or add "
                          f"--overwrite.")
    os.replace(tmp, path)


@contextmanager
def new_folder(path: Path, earlier: re.Pattern | None = None) -> Iterator[Path]:
    """Yield the folder to write a new output folder's files into: a hidden sibling that is renamed to `path` once
    the block ends without error, and removed if it raises.

    An existing folder (empty, or with files an --overwrite allowed) is kept: renaming over it would drop the user's
    own folder (its permissions, or the shell's working directory). With `earlier` (the names a previous run of the
    same command writes there), the new files are made in a hidden folder inside it; once complete, the files whose
    names match `earlier` are removed from the folder (an earlier explain's maps would sit beside the new ones and
    look current) and the new ones moved in; the user's other files stay. Without it, the folder is written in place.

    Raises:
        OutputError: the folder cannot be made, or files appeared at `path` meanwhile (another command writing
            the same folder); those are kept as they are and ours are removed.
    """
    path = Path(path)
    if path.is_dir() and earlier is None:
        yield path
        return
    if path.is_symlink() and not path.is_dir():  # a dangling link: make the folder it names, keeping the link
        path = path.resolve()
    replacing = path.is_dir()
    if replacing:  # before any work: an entry named like an output that is no file cannot be replaced
        odd = [e for e in path.iterdir() if earlier.fullmatch(e.name) and e.is_dir() and not e.is_symlink()]
        if odd:
            raise OutputError(f"{odd[0]}: a folder with the name of one of this command's output files; move it "
                              f"away, or choose another output folder.")
    # replacing: a hidden folder inside it (on its own file system, for the moves); else one beside it
    tmp = _hidden_folder(path if replacing else path.parent, "new" if replacing else path.name, path)
    try:
        yield tmp
        if replacing:
            _swap_in(tmp, path, earlier)
        else:
            _rename_folder(tmp, path)
    except OutputError as exc:  # a file inside failed (a full disk): name the folder asked for, not the hidden one
        raise type(exc)(str(exc).replace(str(tmp), str(path))) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, folder: Path, earlier: re.Pattern) -> None:
    """Replace the files of `folder` matching `earlier` by those in `new` (a hidden folder inside it): the earlier
    ones are moved aside first and put back if anything fails or interrupts, so the folder holds one complete set;
    JSON manifests are moved in last, after the files they list."""
    aside = new / ".earlier"
    os.mkdir(aside)
    moved_aside, moved_in = [], []
    try:
        for old in sorted(folder.iterdir()):
            if old != new and earlier.fullmatch(old.name) and (old.is_file() or old.is_symlink()):
                os.replace(old, aside / old.name)
                moved_aside.append(old.name)
        for item in sorted((e for e in new.iterdir() if e != aside), key=lambda e: (e.suffix == ".json", e.name)):
            os.replace(item, folder / item.name)
            moved_in.append(item.name)
    except BaseException as exc:
        for name in moved_in:
            (folder / name).unlink(missing_ok=True)
        for name in moved_aside:
            os.replace(aside / name, folder / name)
        if isinstance(exc, OSError):
            raise OutputError(f"{folder}: cannot replace the earlier output ({exc.strerror or exc}); it is kept as it "
                              f"was.") from exc
        raise


def _hidden_folder(parent: Path, name: str, path: Path) -> Path:
    """A new hidden folder in `parent` for the output folder `path` (named in errors), made with the umask's
    permissions: mkdtemp's 0700 would hide the output from the user's group."""
    tmp = parent / f".{name[:80]}.{secrets.token_hex(4)}.tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the folder ({exc.strerror or exc}); choose a writable place.") \
            from exc
    return tmp


def _rename_folder(tmp: Path, path: Path) -> None:
    try:
        os.rename(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(f"{path}: files appeared there while the command ran (another command writing the "
                              f"same folder?); they are kept as they are. Run the command again with a new "
                              f"folder.") from exc
        raise OutputError(f"{path}: cannot write the folder ({exc.strerror or exc}); choose a writable place.") \
            from exc


def check_record_folder(run: Path, kind: str) -> None:
    """Before attack or corrupt does its work: RUN/<kind> ("attacks", "corruptions"), where every evaluation of the
    run is recorded, is a folder that can be made or written."""
    folder = run / kind
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"{folder}: not a folder, so this run cannot record the evaluation there; move that file "
                          f"away and run the command again.")
    if not os.access(folder if folder.is_dir() else run, os.W_OK):
        raise OutputError(f"{folder}: no permission to write there (a read-only or someone else's run?), where this "
                          f"run records the evaluation; copy the run to a writable place and give the copy.")


@contextmanager
def record_folder(run: Path, kind: str, name: str) -> Iterator[Path]:
    """Yield the folder to fill with RUN/<kind>/<name>'s files: a hidden sibling renamed into place when the block
    ends, so a killed or failed evaluation leaves no half record in the run (check_record_folder looked before the
    work; this catches what it cannot see)."""
    path = run / kind / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot make it ({exc.strerror or exc}), so the run does not record this "
                          f"evaluation (a --json report, if asked for, is written); copy the run to a writable place "
                          f"to keep the record with it.") from exc
    with new_folder(path) as folder:
        yield folder


def _mode_for(path: Path) -> int:
    """The permissions a written file gets: those of the file it replaces, else what the umask gives a new file
    (mkstemp's own 0600 would hide every output from the user's group)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


MAX_TEXT_BYTES = 16 * 1024**2  # a recipe or a run's JSON is kilobytes; bounds what a damaged or planted file costs


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file (a recipe, a run's model.json or report.json), refusing before reading it one that
    is larger than `limit` bytes or is not a regular file (a FIFO or device would block or never end).

    Raises:
        ValueError: too large or not a regular file (UnicodeDecodeError, a ValueError, for text that is not UTF-8).
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait for a writer
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{Path(path).name} is not a regular file")
        data = f.read(limit + 1)  # also stops a file that grows while it is read
    if info.st_size > limit or len(data) > limit:
        raise ValueError(f"{Path(path).name} is larger than {limit // 1024**2} MB, far more than such a file holds")
    return data.decode("utf-8")


class DamagedFileError(MedtricksError):
    """A file medtricks wrote earlier (a cached result) no longer parses or holds what it should."""


def read_json(path: Path, fix: str) -> dict:
    """A JSON object that medtricks wrote earlier (a cached unit result); `fix` says what to do when it is damaged.

    Raises:
        DamagedFileError: unreadable, not JSON, or not an object, naming the file and `fix`.
    """
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DamagedFileError(f"{path} is damaged ({str(exc).splitlines()[0]}); {fix}") from exc
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} is damaged (a JSON {type(data).__name__}, not an object); {fix}")
    return data


def write_text(path: Path, text: str, replace: bool = True) -> None:
    """Write a text file atomically (`replace`: as in atomic_write)."""
    atomic_write(path, lambda tmp: tmp.write_text(text), replace)


def write_json(path: Path, data, replace: bool = True) -> None:
    """Write JSON atomically (indented, newline-terminated; `replace`: as in atomic_write). JSON has no NaN or
    Infinity (Python would write them as bare tokens that strict parsers refuse): a non-finite number, an undefined
    value, is written as null."""
    write_text(path, to_json(data, indent=2) + "\n", replace)


def to_json(data, indent: int | None = None) -> str:
    """Strict JSON text of `data`: a non-finite number (an undefined value) becomes null (see write_json)."""
    return json.dumps(_json_safe(data), indent=indent, allow_nan=False)


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line (rewritten atomically so a crash never leaves a half line)."""
    old = path.read_text() if path.is_file() else ""
    write_text(path, old + to_json(row) + "\n")


def _is_run_dir(folder: Path) -> bool:
    return (folder / RECIPE_FILE).is_file() or (folder / MODEL_JSON).is_file()


def run_owning(path: Path) -> Path | None:
    """The run directory whose own file or folder (RUN_FILES) `path` is or lies in, else None."""
    path = Path(path).resolve()
    for folder in path.parents:
        if _is_run_dir(folder) and path.relative_to(folder).parts[0] in RUN_FILES:
            return folder
    return None


def check_output(path: str | Path, overwrite: bool = False, option: str = "--json", folder: bool = False) -> Path:
    """Check a file (or, with `folder`, a folder of files) that an option is about to write; return it as a Path.

    A new folder is fine for `folder=True` (it is created when written); an existing one must be empty unless
    `overwrite`. Symlinks are followed, so a link to a run's model.json is refused as the file itself.

    Raises:
        OutputError: naming the path, the option and what to do.
    """
    path = Path(path)
    try:
        return _check_output(path, overwrite, option, folder)
    except OSError as exc:  # a name over the file system's limit, a loop of links, ...
        raise OutputError(f"{option} {short(str(path))}: cannot use that path ({exc.strerror or exc}); choose another "
                          f"(a name of at most 255 bytes in an existing, writable folder).") from exc


def refuse_run_files(path: Path, option: str, folder: bool = False) -> None:
    """Refuse an output that is (or lies in) a run's own files, or, with `folder`, a run directory itself."""
    target = Path(path).resolve()
    run = run_owning(target)
    if run is not None:
        raise OutputError(f"{option} {path}: that is part of the run {run} ({target.relative_to(run)}), which only "
                          f"`medtricks finetune` writes; choose a path outside the run's own files.")
    if folder and _is_run_dir(target):
        raise OutputError(f"{option} {path}: that is a run directory, whose own files only `medtricks finetune` "
                          f"writes; choose a folder outside it (or a new folder inside it).")


def _check_output(path: Path, overwrite: bool, option: str, folder: bool) -> Path:
    if str(path) == "-":
        raise OutputError(f"{option} -: medtricks writes files, not standard output; give a file name.")
    if path.exists() and not (path.is_file() or path.is_dir()):  # /dev/stdout resolves to a pipe that has no name
        raise OutputError(f"{option} {path}: that is not a regular file (a device, a pipe, a socket or a terminal); "
                          f"give a file name.")
    target = path.resolve()
    refuse_run_files(path, option, folder)
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: the folder {parent} does not exist (or is not a folder); create it "
                          f"first or choose another path.")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{option} {path}: no permission to write in {parent}; choose a writable folder.")
    if folder:
        if target.exists() and not target.is_dir():
            raise OutputError(f"{option} {path}: a file of that name exists; give a folder.")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise OutputError(f"{option} {path}: the folder is not empty and its files could be replaced; choose a "
                              f"new folder, or add --overwrite.")
        return path
    if target.is_dir():
        raise OutputError(f"{option} {path}: that is a folder; give a file name.")
    if target.exists() and not overwrite:
        raise OutputError(f"{option} {path}: the file exists and medtricks never replaces a file you did not ask to "
                          f"replace; choose another name, or add --overwrite.")
    return path
