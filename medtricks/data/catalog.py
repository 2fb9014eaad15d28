"""The catalog of named public data sets: what each name is (licence, citation, data card, downloads, prepare
step) and where it lives in the cache. medtricks.data.public fetches and prepares them; this module only describes
them and resolves a name to its filled cache folder (medtricks.data.public's docstring tells the whole story).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medtricks.data import prepare, prepare_challenges
from medtricks.errors import DataError, short
from medtricks.files import cache_root

MIRROR_ENV = "MEDTRICKS_DATA_MIRROR"


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
