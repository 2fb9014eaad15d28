"""Shared fixtures: the real data sets beside the checkout (skipped when absent) and a small phantom set."""

from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(name: str) -> Path:
    """Path of a real data set in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real data sets live in ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """24 synthetic phantom DICOMs (64 px) with labels.csv, made once per test session."""
    from medtricks.data.synth import synthesize

    out = tmp_path_factory.mktemp("phantoms") / "set"
    synthesize(out, n=24, seed=3, size=64)
    return out


@pytest.fixture(scope="session")
def phantoms_train(tmp_path_factory) -> Path:
    """80 synthetic phantoms (48 px): enough patients for non-empty train / val / test splits."""
    from medtricks.data.synth import synthesize

    out = tmp_path_factory.mktemp("phantoms_train") / "set"
    synthesize(out, n=80, seed=5, size=48)
    return out


@pytest.fixture(scope="session")
def findings(tmp_path_factory) -> Path:
    """200 phantoms (32 px, 100 patients) with two planted findings, square and stripe (multilabel_data)."""
    from multilabel_data import write_findings_set

    return write_findings_set(tmp_path_factory.mktemp("findings") / "set")


@pytest.fixture(scope="session")
def ml_run(findings, tmp_path_factory) -> Path:
    """A multi-label demo run trained on `findings` (4 epochs, a few seconds): test AUROC > 0.9 per finding. Tests
    that write into it (attacks/) leave its own files alone."""
    from multilabel_data import FAST

    from medtricks.finetune import finetune

    return finetune("demo", data=findings, out=tmp_path_factory.mktemp("ml_runs") / "run", overrides=FAST)


@pytest.fixture(autouse=True, scope="session")
def _hermetic_weights(tmp_path_factory):
    """No test downloads or reads the user's cache: offline, with an empty cache folder of its own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDTRICKS_OFFLINE", "1")
    patch.setenv("MEDTRICKS_CACHE", str(tmp_path_factory.mktemp("medtricks-cache")))
    yield
    patch.undo()


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (path -> digest), to show a command changed none of them."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@contextmanager
def nothing_lost(*folders: Path):
    """Assert that no file under `folders` (a data set, existing runs) was changed, removed or added by the block."""
    before = snapshot(*folders)
    yield
    after = snapshot(*folders)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert (changed, sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())) == ([], [], []), \
        "files changed / removed / added"
