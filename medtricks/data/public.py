"""Named public data sets: a recipe's data.source (or `--data`) may be a name such as `medmnist:pneumoniamnist@28`.

Each name has a folder in the data cache, `$MEDTRICKS_CACHE/data/<name>` (default `~/.cache/medtricks/data`; the
`:` of a name becomes a sub-folder: `medmnist/pneumoniamnist@28`), filled once by one of two commands:
- `medtricks data fetch NAME`: sets with a stable direct download (the MedMNIST .npz files on Zenodo). The file is
  downloaded into a `.part` file beside its target, resumed with an HTTP Range request when the transfer breaks,
  checked against the checksum its publisher lists, and only then renamed into place: the cache never holds a
  half or unverified file. MEDTRICKS_OFFLINE=1 never downloads; MEDTRICKS_DATA_MIRROR replaces the URL base
  (everything before the file name), for a local mirror or a test server. A set published as a repository
  (the COVID-19 image data collection) is fetched as the archive of a pinned commit, extracted safely
  (medtricks.data.archive) and prepared by its prepare step, all in a temporary folder beside its cache folder
  that is renamed into place at the end: the cache holds the prepared set or nothing.
- `medtricks data prepare NAME RAW_DIR`: sets whose licence asks users to download them themselves (NIH
  ChestX-ray14, Kermany's pediatric CXR, the COVID-19 image data collection, IDRiD grading, ISIC 2016, CheXpert):
  medtricks.data.prepare and .prepare_challenges turn the official layout into a labels.csv. A set may take
  options of its own (CheXpert: `--uncertain`, `--views`), listed in PublicSet.options.
A name whose folder is empty is an error naming the command that fills it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from medtricks.data import archive, prepare
from medtricks.data.catalog import MIRROR_ENV, REGISTRY, PublicSet, RemoteFile, find_set
from medtricks.errors import DataError, short
from medtricks.files import refuse_run_files, write_text

logger = logging.getLogger(__name__)

ATTEMPTS = 3  # a broken transfer is resumed (HTTP Range) this many times within one fetch


# ---- fetch -------------------------------------------------------------------------------------------------------


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _transfer(url: str, part: Path, progress: Callable[[int, int | None], None] | None) -> None:
    """Download `url` into `part`, continuing after its current size with a Range request when it has one."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part file is already whole: nothing left to send
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the Range: start again
            logger.info("%s: the server does not resume transfers; downloading from the start", url)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f:
            done = have
            while chunk := response.read(1 << 16):
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if total is not None and done < total:
            raise http.client.IncompleteRead(b"", total - done)


def _verify(part: Path, remote: RemoteFile) -> str:
    """Check the downloaded file against the published checksum; delete it on a mismatch. Returns a description. A
    file without one got here only with --no-verify (_refuse_unchecked runs before its download)."""
    for algorithm, expected in (("sha256", remote.sha256), ("md5", remote.md5)):
        if expected:
            actual = _digest(part, algorithm)
            if actual != expected:
                part.unlink(missing_ok=True)
                raise DataError(f"{remote.source_url()}: the downloaded file has {algorithm} {actual}, not the "
                                f"published {expected}; it was deleted and nothing was installed. Try again later "
                                f"(a proxy or an interrupted mirror can corrupt a transfer), or check the mirror "
                                f"({MIRROR_ENV}).")
            return f"{algorithm} {actual} (verified)"
    actual = _digest(part, "sha256")
    logger.warning("%s installed UNVERIFIED (no published checksum): sha256 %s", remote.filename, actual)
    return f"sha256 {actual} (NOT verified: --no-verify)"


def _refuse_unchecked(remote: RemoteFile, no_verify: bool) -> None:
    """Refuse, before any transfer, a file without a registered checksum unless `no_verify` (a download that would
    be deleted unverified costs the user the transfer for nothing)."""
    if not (remote.sha256 or remote.md5) and not no_verify:
        raise DataError(f"{remote.source_url()}: no checksum is registered for {remote.filename}"
                        + (f": {remote.unchecked}" if remote.unchecked else "") + ", so medtricks cannot verify the "
                        "download. Nothing was downloaded. Add --no-verify to download and install it unverified "
                        "(fetch then prints its sha256: record it to compare later downloads).")


def _download(name: str, url: str, part: Path, by_hand: str,
              progress: Callable[[int, int | None], None] | None) -> None:
    """Download `url` into `part`, resuming up to ATTEMPTS times; a DataError (with `by_hand`) when it keeps failing
    or no network is allowed. Bytes received are kept in `part` for the next command to resume."""
    if os.environ.get("MEDTRICKS_OFFLINE"):
        raise DataError(f"{name}: MEDTRICKS_OFFLINE is set, so nothing is downloaded. {by_hand}")
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _transfer(url, part, progress)
            return
        except (OSError, http.client.HTTPException, ValueError) as exc:
            kept = part.stat().st_size if part.is_file() else 0
            if not kept:
                part.unlink(missing_ok=True)
            if attempt == ATTEMPTS or not kept:
                raise DataError(f"{name}: cannot download {url} ({exc}). {by_hand}"
                                + (f" The {kept} bytes received are kept in {part}; the same command resumes "
                                   f"from there." if kept else "")) from exc
            logger.warning("%s: transfer broke after %d bytes (%s); resuming", url, kept, exc)


def fetch(name: str, force: bool = False, no_verify: bool = False,
          progress: Callable[[int, int | None], None] | None = None) -> tuple[Path, list[str]]:
    """Download, verify and install the files of a named set into its cache folder.

    A set with a prepare step too (the COVID-19 image data collection) is downloaded as one archive, which is
    extracted and prepared into the cache folder (`_fetch_archive`).

    Args:
        name: a registered name with direct downloads (`medmnist:pneumoniamnist@28`).
        force: download again even when the files are already installed.
        no_verify: install a file for which no checksum is registered (never one whose checksum mismatches).
        progress: optional callable(bytes_done, bytes_total or None) during each transfer.

    Returns:
        The cache folder and one line per file (name and checksum), then the prepare step's summary, if any.

    Raises:
        DataError: an unknown name, a set that is prepared rather than fetched, no network (naming the URL and the
            folder to put the file in by hand), a transfer that keeps breaking, a checksum mismatch, a file without
            a checksum and no `no_verify`, or (archives) an unsafe archive or one whose layout prepare refuses.
    """
    spec = find_set(name)
    if not spec.files:
        raise DataError(f"{name} has no direct download (its licence asks you to download it yourself): run "
                        f"{spec.how_to_get()}.")
    if spec.prepare is not None:
        return _fetch_archive(spec, force, no_verify, progress)
    folder = spec.folder
    lines = []
    for remote in spec.files:
        target = folder / remote.filename
        if target.is_file() and not force:
            lines.append(f"{target} (already installed; --force downloads it again)")
            continue
        url = remote.source_url()
        by_hand = (f"On a machine with internet, download {url} and put it at {target} (the folder is "
                   f"$MEDTRICKS_CACHE/data/..., default ~/.cache/medtricks/data), or pass --data FILE to use it where "
                   f"it is.")
        part = target.with_name(target.name + ".part")
        _refuse_unchecked(remote, no_verify)
        _download(name, url, part, by_hand, progress)
        checked = _verify(part, remote)
        os.replace(part, target)
        lines.append(f"{target}  {checked}")
    write_text(folder / "SOURCE.txt", f"{spec.name}: {spec.title}\nfiles: {', '.join(f.url for f in spec.files)}\n"
                                      f"licence: {spec.licence}\ncitation: {spec.citation}\n")
    return folder, lines


def _fetch_archive(spec: PublicSet, force: bool, no_verify: bool,
                   progress: Callable[[int, int | None], None] | None) -> tuple[Path, list[str]]:
    """Download the set's one archive (resumable `.part` beside the cache folder), verify it, extract it safely into
    a temporary folder beside the cache folder, prepare its single top folder there and rename the result into
    place. On any error the temporary folder and the archive are removed (a broken transfer keeps its `.part`)."""
    folder, remote = spec.folder, spec.files[0]
    if spec.is_ready() and not force:
        return folder, [f"{folder / 'labels.csv'} (already installed; --force downloads it again)"]
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise DataError(f"{folder}: the cache folder of {spec.name} exists and holds files but no labels.csv; add "
                        f"--force to replace it, or remove it.")
    url = remote.source_url()
    by_hand = (f"On a machine with internet, download {url}, unpack it and run `medtricks data prepare {spec.name} "
               f"<the unpacked folder>`, which writes labels.csv into {folder} (the folder is $MEDTRICKS_CACHE/"
               f"data/..., default ~/.cache/medtricks/data); keep the unpacked folder where it is.")
    part = folder.parent / (remote.filename + ".part")
    _refuse_unchecked(remote, no_verify)
    _download(spec.name, url, part, by_hand, progress)
    try:
        checked = _verify(part, remote)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            lines = [f"{url}  {checked}", *_prepare_archive(spec, part, tmp, folder)]
            write_text(tmp / "SOURCE.txt", f"{spec.name}: {spec.title}\narchive: {remote.url}\n{checked}\n"
                                           f"licence: {spec.licence}\ncitation: {spec.citation}\n")
            _rename_into_place(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        part.unlink(missing_ok=True)  # extracted (or refused): the archive is not kept
    return folder, lines


def _prepare_archive(spec: PublicSet, part: Path, tmp: Path, folder: Path) -> list[str]:
    """Extract `part` into `tmp` and write `tmp/labels.csv` with paths as they will be once `tmp` is `folder`."""
    files, size = archive.extract_tar(part, tmp)
    tops = sorted(p.name for p in tmp.iterdir())
    if len(tops) != 1 or not (tmp / tops[0]).is_dir():
        raise DataError(f"{spec.files[0].source_url()}: the archive should hold one top folder (the repository at its "
                        f"commit); it holds {tops[:5]}. Nothing was installed.")
    try:
        lines = spec.prepare(tmp / tops[0], tmp, **_prepare_options(spec, None))
    except DataError as exc:
        raise DataError(f"{spec.name}: the downloaded archive does not have the layout prepare expects: {exc} Nothing "
                        f"was installed.") from exc
    # prepare wrote absolute paths into tmp; they must point into the cache folder once tmp is renamed to it
    here, there = tmp.resolve(), tmp.resolve().parent / folder.name
    rows = prepare.read_csv(tmp / "labels.csv", ("path",))
    for row in rows:
        if not Path(row["path"]).is_relative_to(here):
            raise DataError(f"{spec.name}: the downloaded archive names an image outside itself ({row['path']}). "
                            f"Nothing was installed.")
        row["path"] = str(there / Path(row["path"]).relative_to(here))
    prepare.write_labels(tmp, list(rows[0]), rows)
    return [f"{folder / tops[0]}: {files} files ({size / 1e6:.1f} MB) extracted",
            *(line.replace(str(tmp), str(folder)) for line in lines)]


def _rename_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished folder `tmp` to `folder` (same file system: atomic); an existing `folder` (--force, or
    an empty one) is moved aside first and removed only once the new one is in place."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = tmp.with_name(tmp.name + ".old")
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- prepare -----------------------------------------------------------------------------------------------------


def _prepare_options(spec: PublicSet, options: dict[str, str | None] | None) -> dict[str, str]:
    """The set's options with defaults filled in; an option the set does not take, or a value outside its choices,
    is a DataError."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    known = {o.name: o for o in spec.options}
    for key, value in given.items():
        if key not in known:
            takers = [n for n, s in REGISTRY.items() if any(o.name == key for o in s.options)]
            raise DataError(f"--{key} does not apply to {spec.name}" + (f"; only to {', '.join(takers)}" if takers
                            else "") + ". Leave it out.")
        if value not in known[key].choices:
            raise DataError(f"--{key} {short(value)}: not one of {', '.join(known[key].choices)} ({spec.name}).")
    return {o.name: given.get(o.name, o.choices[0]) for o in spec.options}


def prepare_set(name: str, raw_dir: str | Path, out: str | Path | None = None, overwrite: bool = False,
                options: dict[str, str | None] | None = None) -> tuple[Path, list[str]]:
    """Write the medtricks labels.csv of a named set from its official raw download (RAW_DIR is only read).

    Args:
        name: a registered name with a prepare step (`nih-chestxray14`, `kermany-cxr`).
        raw_dir: the unpacked official download.
        out: where labels.csv goes (default the set's cache folder, so the name resolves to it).
        overwrite: allow an existing non-empty `out` (its labels.csv is replaced).
        options: the set's own options (PublicSet.options, e.g. {"uncertain": "ones"} for chexpert); a None value
            or a missing key takes the default, the option's first choice.

    Returns:
        The output folder and summary lines (counts, what was kept and dropped).

    Raises:
        DataError: unknown name, a set that is fetched, a RAW_DIR that does not match the official layout (naming
            the missing file or column), an option the set does not take, or a non-empty `out` without `overwrite`.
    """
    spec = find_set(name)
    if spec.prepare is None:
        raise DataError(f"{name} is downloaded ready to use: run `medtricks data fetch {name}` (no prepare step).")
    chosen = _prepare_options(spec, options)
    raw = Path(raw_dir).expanduser()
    if not raw.is_dir():
        raise DataError(f"{raw}: RAW_DIR is not a folder. Download {spec.raw} and give the unpacked folder.")
    target = Path(out).expanduser() if out is not None else spec.folder
    raw_resolved, target_resolved = raw.resolve(), target.resolve()
    if target_resolved == raw_resolved or raw_resolved in target_resolved.parents:
        raise DataError(f"--out {target}: it lies inside RAW_DIR {raw}, which prepare never writes into; choose "
                        f"another folder (the default is the cache folder {spec.folder}).")
    refuse_run_files(target, "--out", folder=True)
    if target.exists() and not target.is_dir():
        raise DataError(f"--out {target}: a file of that name exists; give a folder.")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise DataError(f"--out {target}: the folder exists and is not empty; choose a new folder, or add "
                        f"--overwrite to replace its labels.csv.")
    lines = spec.prepare(raw, target, **chosen)
    settings = " ".join(f"--{k} {v}" for k, v in chosen.items())
    write_text(target / "SOURCE.txt", f"{spec.name}: {spec.title}\nprepared from: {raw_resolved}\n"
                                      + (f"options: {settings}\n" if settings else "")
                                      + f"licence: {spec.licence}\ncitation: {spec.citation}\n")
    return target, lines
