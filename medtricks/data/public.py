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
from dataclasses import dataclass
from pathlib import Path

from medtricks.data import archive, prepare, prepare_challenges
from medtricks.errors import DataError, short
from medtricks.files import cache_root, write_text

logger = logging.getLogger(__name__)

MIRROR_ENV = "MEDTRICKS_DATA_MIRROR"
ATTEMPTS = 3  # a broken transfer is resumed (HTTP Range) this many times within one fetch


@dataclass(frozen=True)
class RemoteFile:
    """One file with a direct download. The checksums are the publisher's (None: not published, not verified);
    `unchecked` says why a file has none (printed when fetch refuses it without --no-verify)."""

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    unchecked: str = ""

    def source_url(self) -> str:
        """The URL, with its base replaced by $MEDTRICKS_DATA_MIRROR when that is set."""
        mirror = os.environ.get(MIRROR_ENV)
        return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url


@dataclass(frozen=True)
class PrepareOption:
    """An option of one set's prepare step: the keyword of its prepare function, also `--NAME` of `data prepare`."""

    name: str
    choices: tuple[str, ...]  # the first is the default
    help: str


@dataclass(frozen=True)
class PublicSet:
    """A named public data set: where it lives in the cache, how it gets there, its licence and citation.

    Attributes:
        name: what data.source / --data say (`medmnist:pneumoniamnist@28`, `nih-chestxray14`).
        title: one line for `medtricks data list`.
        licence, citation: printed by fetch and prepare; also in the data card.
        card: the data card (data_cards/<card>).
        files: direct downloads (`medtricks data fetch`).
        prepare: prepare(raw_dir, out, **options) -> summary lines (`medtricks data prepare`).
        raw: where to download the raw data for prepare, and what RAW_DIR must hold.

    A set has files, a prepare step, or both. With both (the COVID-19 image data collection), `files` is one archive
    of the raw data (a repository at a pinned commit) with a single top folder: `data fetch` downloads it, extracts
    it into the cache folder and runs `prepare` on that top folder, and the archive itself is not kept; `data
    prepare` still works on a copy the user downloaded (a clone). Such a set is ready when its labels.csv is.
        options: the options `prepare` takes (none for most sets).
    """

    name: str
    title: str
    licence: str
    citation: str
    card: str
    files: tuple[RemoteFile, ...] = ()
    prepare: Callable[..., list[str]] | None = None
    raw: str = ""
    options: tuple[PrepareOption, ...] = ()

    @property
    def folder(self) -> Path:
        return data_dir().joinpath(*self.name.split(":"))

    def is_ready(self, folder: Path | None = None) -> bool:
        """The set's files are in `folder` (default its cache folder): every fetched file, or a labels.csv."""
        folder = self.folder if folder is None else folder
        if self.files and self.prepare is None:
            return all((folder / f.filename).is_file() for f in self.files)
        return (folder / "labels.csv").is_file()

    def how_to_get(self) -> str:
        """The command (and the download) that fills the cache folder."""
        prepare_step = (f"`medtricks data prepare {self.name} RAW_DIR` after downloading the raw data ({self.raw}) "
                        f"into RAW_DIR")
        if self.files and self.prepare is not None:
            return f"`medtricks data fetch {self.name}` (or {prepare_step})"
        if self.files:
            return f"`medtricks data fetch {self.name}`"
        return prepare_step


def data_dir() -> Path:
    """$MEDTRICKS_CACHE/data, else ~/.cache/medtricks/data."""
    return cache_root() / "data"


_MEDMNIST_URL = "https://zenodo.org/records/10519652/files/"  # MedMNIST v3.0 (MedMNIST+ sizes), Zenodo
_MEDMNIST_CITATION = ("Yang J. et al., MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical "
                      "image classification, Scientific Data 10, 41 (2023); cite also the source data set of {set}.")
# The publisher's MD5 of each file at 28, 64, 128 and 224 px, copied from the official medmnist package
# (github.com/MedMNIST/MedMNIST, medmnist/info.py of version 3.0.2, keys MD5, MD5_64, MD5_128, MD5_224).
# No sha256 is published for these files. The 2D sets only: the 3D ones (organmnist3d, ...) are volumes, which
# medtricks does not read.
_MEDMNIST = {
    "pneumoniamnist": ("CC BY 4.0", "pediatric CXR, normal vs pneumonia (Kermany et al. 2018)", (
        "28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6", "05b46931834c231683c68f40c47b2971",
        "d6a3c71de1b945ea11211b03746c1fe1")),
    "retinamnist": ("CC BY 4.0", "fundus photographs, diabetic retinopathy grade 0-4 (DeepDRiD)", (
        "bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc", "e48e916a24454daf90583d4e6efb1a18",
        "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    "chestmnist": ("CC BY 4.0", "NIH ChestX-ray14, 14 findings, multi-label (Wang et al. 2017)", (
        "02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16", "db107e5590b27930b62dbaf558aebee3",
        "45bd33e6f06c3e8cdb481c74a89152aa")),
    "dermamnist": ("CC BY-NC 4.0", "dermoscopy, 7 diagnoses (HAM10000)", (
        "0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f", "2defd784463fa5243564e855ed717de1",
        "8974907d8e169bef5f5b96bc506ae45d")),
    "breastmnist": ("CC BY 4.0", "breast ultrasound, malignant vs normal/benign", (
        "750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364", "363e4b3f8d712e9b5de15470a2aaadf1",
        "b56378a6eefa9fed602bb16d192d4c8b")),
    "octmnist": ("CC BY 4.0", "retinal OCT, 4 classes (Kermany et al. 2018)", (
        "c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf", "0a97e76651ace45c5d943ee3f65b63ae",
        "abc493b6d529d5de7569faaef2773ba3")),
    "pathmnist": ("CC BY 4.0", "colorectal histology patches (NCT-CRC-HE-100K), 9 tissue types", (
        "a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616", "ac42d08fb904d92c244187169d1fd1d9",
        "2c51a510bcdc9cf8ddb2af93af1eadec")),
    "bloodmnist": ("CC BY 4.0", "blood-cell microscopy, 8 cell types", (
        "7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b", "adace1e0ed228fccda1f39692059dd4c",
        "b718ff6835fcbdb22ba9eacccd7b2601")),
    "tissuemnist": ("CC BY 4.0", "kidney-cortex cell microscopy (BBBC051), 8 cell types", (
        "ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344", "61b955355d7425a89687b06cca3ce0c2",
        "b077128c4a949f0a4eb01517f9037b9c")),
    "organamnist": ("CC BY 4.0", "abdominal CT (LiTS), 11 organs, axial slices", (
        "68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288", "eeae80d0a227a8d099027e1b3cfd3b60",
        "50747347e05c87dd3aaf92c49f9f3170")),
    "organcmnist": ("CC BY 4.0", "abdominal CT (LiTS), 11 organs, coronal slices", (
        "b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9", "773c1f009daa3fe5d9a2a201b2a7ed94",
        "050f5e875dc056f6768abf94ec9995d1")),
    "organsmnist": ("CC BY 4.0", "abdominal CT (LiTS), 11 organs, sagittal slices", (
        "9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3", "ded0c5fa01a95dc4978b956f613e9b8e",
        "b354719e553fbbb2513d5533f52a4cb1")),
}
MEDMNIST_SIZES = (28, 64, 128, 224)


def _medmnist(flag: str, size: int, licence: str, what: str, md5: str) -> PublicSet:
    filename = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    return PublicSet(f"medmnist:{flag}@{size}", f"MedMNIST {flag} at {size} px: {what}", licence,
                     _MEDMNIST_CITATION.format(set=flag), "pneumoniamnist.md" if flag == "pneumoniamnist" else
                     "retinamnist.md" if flag == "retinamnist" else "README.md",
                     files=(RemoteFile(_MEDMNIST_URL + filename + "?download=1", filename, md5=md5),))


_NIH_CITATION = ("Wang X. et al., ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised "
                 "Classification and Localization of Common Thorax Diseases, IEEE CVPR 2017, 3462-3471. Data: NIH "
                 "Clinical Center, https://nihcc.app.box.com/v/ChestXray-NIHCC (acknowledge the NIH Clinical Center).")
_KERMANY_CITATION = ("Kermany D. et al., Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep "
                     "Learning, Cell 172(5), 1122-1131 (2018); data: Kermany D., Zhang K., Goldbaum M., Labeled "
                     "Optical Coherence Tomography (OCT) and Chest X-Ray Images for Classification, Mendeley Data v2, "
                     "doi:10.17632/rscbjbr9sj.2.")

# The collection is a git repository that may still change: fetch pins one commit, so every fetch gives the same
# metadata.csv and images. GitHub builds the archive on request and publishes no checksum of its bytes.
COVID_COMMIT = "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8"
COVID_ARCHIVE = RemoteFile(
    f"https://codeload.github.com/ieee8023/covid-chestxray-dataset/tar.gz/{COVID_COMMIT}",
    f"covid-chestxray-dataset-{COVID_COMMIT}.tar.gz",
    unchecked=f"the repository commit {COVID_COMMIT} is pinned, but the archive bytes have no published checksum "
              f"(GitHub builds them on request)")
_COVID_CITATION = ("Cohen J.P., Morrison P., Dao L., Roth K., Duong T.Q., Ghassemi M., COVID-19 Image Data Collection: "
                   "Prospective Predictions Are the Future, arXiv 2006.11988 (2020); and arXiv 2003.11597. Per-image "
                   "source URL and licence in labels.csv.")

_IDRID_CITATION = ("Porwal P. et al., Indian Diabetic Retinopathy Image Dataset (IDRiD): A Database for Diabetic "
                   "Retinopathy Screening Research, Data 3(3), 25 (2018), doi:10.3390/data3030025; IEEE Dataport, "
                   "doi:10.21227/H25W98.")
_ISIC2016_CITATION = ("Gutman D. et al., Skin Lesion Analysis toward Melanoma Detection: A Challenge at the "
                      "International Symposium on Biomedical Imaging (ISBI) 2016, hosted by the International Skin "
                      "Imaging Collaboration (ISIC), arXiv 1605.01397 (2016).")
_CHEXPERT_CITATION = ("Irvin J. et al., CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and Expert "
                      "Comparison, AAAI 2019, arXiv 1901.07031. Data: Stanford AIMI, "
                      "https://stanfordmlgroup.github.io/competitions/chexpert/ (Research Use Agreement).")

REGISTRY: dict[str, PublicSet] = {s.name: s for s in [
    *[_medmnist(flag, size, licence, what, md5s[i]) for flag, (licence, what, md5s) in _MEDMNIST.items()
      for i, size in enumerate(MEDMNIST_SIZES)],
    PublicSet("nih-chestxray14", "NIH ChestX-ray14: 112,120 adult frontal CXR, 14 NLP-mined findings (multi-label)",
              "no restrictions on use (NIH Clinical Center); attribution required", _NIH_CITATION,
              "nih_chestxray14.md", prepare=prepare.prepare_nih_chestxray14,
              raw="https://nihcc.app.box.com/v/ChestXray-NIHCC: Data_Entry_2017.csv, train_val_list.txt, "
                  "test_list.txt and the images_*.tar.gz parts unpacked into images*/ folders"),
    PublicSet("covid19-image-data-collection", "COVID-19 image data collection (Cohen et al.): frontal CXR, "
              "covid19 / other_pneumonia / no_finding", "per image (license column of metadata.csv; CC BY, CC BY-SA, "
              "CC BY-NC-SA, Apache 2.0, ...): keep each image's attribution", _COVID_CITATION,
              "covid19_image_data_collection.md", files=(COVID_ARCHIVE,), prepare=prepare.prepare_covid19_collection,
              raw="git clone https://github.com/ieee8023/covid-chestxray-dataset: metadata.csv and images/"),
    PublicSet("kermany-cxr", "Kermany pediatric CXR (Guangzhou): 5,856 images, normal vs pneumonia",
              "CC BY 4.0", _KERMANY_CITATION, "kermany_cxr.md", prepare=prepare.prepare_kermany_cxr,
              raw="https://data.mendeley.com/datasets/rscbjbr9sj/2 (ChestXRay2017.zip) or the Kaggle copy "
                  "'chest-xray-pneumonia': the chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/ folders"),
    PublicSet("idrid-grading", "IDRiD disease grading (ISBI 2018): 516 fundus photographs, DR grade 0-4 and DME "
              "risk, official train / test", "CC BY 4.0", _IDRID_CITATION, "idrid.md",
              prepare=prepare_challenges.prepare_idrid_grading,
              raw="https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid: "
                  "'B. Disease Grading.zip' unpacked (its '1. Original Images' and '2. Groundtruths' folders)"),
    PublicSet("isic-2016", "ISIC 2016 Part 3 (ISBI 2016): 1,279 dermoscopy images, melanoma vs benign, official "
              "train / test", "CC0 (ISIC 2016 challenge data); cite Gutman et al.", _ISIC2016_CITATION,
              "isic_dermoscopy.md", prepare=prepare_challenges.prepare_isic2016,
              raw="https://challenge.isic-archive.com/data/#2016 (files under "
                  "https://isic-challenge-data.s3.amazonaws.com/2016/): ISBI2016_ISIC_Part3_Training_Data.zip and "
                  "ISBI2016_ISIC_Part3_Test_Data.zip unpacked, and the two ISBI2016_ISIC_Part3_*_GroundTruth.csv"),
    PublicSet("chexpert", "CheXpert (Stanford): chest radiographs, 13 findings mined from reports "
              "(multi-label, with uncertain labels), official train / validation",
              "Stanford CheXpert Research Use Agreement: non-commercial research, no redistribution",
              _CHEXPERT_CITATION, "chexpert.md",
              prepare=prepare_challenges.prepare_chexpert,
              raw="https://stanfordmlgroup.github.io/competitions/chexpert/ (after accepting the agreement): "
                  "CheXpert-v1.0-small.zip unpacked (train.csv, valid.csv, train/, valid/)",
              options=(PrepareOption("uncertain", prepare_challenges.CHEXPERT_UNCERTAIN,
                                     "uncertain (-1.0) findings count as absent (zeros: U-Zeros) or present (ones: "
                                     "U-Ones), Irvin et al. 2019"),
                       PrepareOption("views", prepare_challenges.CHEXPERT_VIEWS,
                                     "frontal radiographs only, or all views (lateral too)"))),
]}


def find_set(name: str) -> PublicSet:
    """The registered set called `name`.

    Raises:
        DataError: an unknown name, listing the known ones.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    raise DataError(f"{short(name)} is not a known public data set. Known names: {known_names()} "
                    f"(`medtricks data list` describes them; MedMNIST sizes: @{', @'.join(map(str, MEDMNIST_SIZES))}).")


def known_names() -> str:
    """The registered names, MedMNIST ones folded into `medmnist:FLAG@SIZE`."""
    flags = ", ".join(_MEDMNIST)
    return f"medmnist:FLAG@SIZE (FLAG one of {flags}), " + ", ".join(n for n in REGISTRY if ":" not in n)


def _looks_like_name(text: str) -> bool:
    """A string that is no path: `medmnist:x`. A bare word (`demo_data`) stays a path, as it always was: a recipe may
    name a folder that does not exist yet (the demo's synthetic phantoms are written there on first use)."""
    if len(text) > 2 and text[1] == ":" and text[0].isalpha():  # C:\\data on Windows
        return False
    return ":" in text


def resolve_named(source: str | Path) -> Path | None:
    """The cache folder of a named source; None when `source` is a path (existing, or written like one).

    Raises:
        DataError: a known name whose folder is not filled yet (naming the command that fills it), or a string that
            is no existing path and looks like a name but is not one (listing the known names).
    """
    text = str(source)
    if text in REGISTRY:
        spec = REGISTRY[text]
        if not spec.is_ready():
            raise DataError(f"data source {text}: the public data set is not in the cache yet ({spec.folder}). Fill "
                            f"it once with {spec.how_to_get()}, or pass --data DIR|FILE to use your own copy.")
        return spec.folder
    if Path(text).expanduser().exists() or not _looks_like_name(text):
        return None
    raise DataError(f"{short(text)}: data source not found: no such file or folder, and not a known public data set "
                    f"name. Known names: {known_names()}. Give a folder (class sub-folders or labels.csv), a CSV "
                    f"manifest or a .npz file with --data or data.source.")


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
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise DataError(f"--out {target}: the folder exists and is not empty; choose a new folder, or add "
                        f"--overwrite to replace its labels.csv.")
    lines = spec.prepare(raw, target, **chosen)
    settings = " ".join(f"--{k} {v}" for k, v in chosen.items())
    write_text(target / "SOURCE.txt", f"{spec.name}: {spec.title}\nprepared from: {raw_resolved}\n"
                                      + (f"options: {settings}\n" if settings else "")
                                      + f"licence: {spec.licence}\ncitation: {spec.citation}\n")
    return target, lines
