"""Each plot writes a real PNG that Pillow opens, for binary and 3-class inputs."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtricks import plots
from medtricks.metrics import compute_metrics
from medtricks.plots import plot_confusion, plot_forest, plot_reliability, plot_roc, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = {2: ["normal", "pneumonia"], 3: ["normal", "bacterial", "viral"]}


def assert_png(path: Path, returned: Path) -> None:
    assert returned == path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 100


def data(n_classes: int, n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += 1.5
    return labels, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_plot_roc(tmp_path, n_classes):
    labels, probs = data(n_classes)
    path = tmp_path / "plots" / "roc.png"  # parent folder is created
    assert_png(path, plot_roc(labels, probs, CLASSES[n_classes], path))


def test_plot_roc_binary_with_operating_point_and_one_class(tmp_path):
    labels, probs = data(2)
    assert_png(tmp_path / "op.png", plot_roc(labels, probs, CLASSES[2], tmp_path / "op.png", threshold=0.4))
    one_class = np.zeros(10, dtype=int)
    assert_png(tmp_path / "one.png", plot_roc(one_class, probs[:10], CLASSES[2], tmp_path / "one.png"))
    with pytest.raises(ValueError, match="classes must name all 3"):
        plot_roc(*data(3), CLASSES[2], tmp_path / "bad.png")


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion(tmp_path, n_classes, normalize):
    labels, probs = data(n_classes)
    matrix = compute_metrics(labels, probs, n_boot=0)["confusion_matrix"]
    path = tmp_path / "confusion.png"
    assert_png(path, plot_confusion(matrix, CLASSES[n_classes], path, normalize=normalize))


def test_plot_confusion_with_an_empty_row(tmp_path):
    path = tmp_path / "confusion.png"
    assert_png(path, plot_confusion(np.array([[3, 1, 0], [0, 0, 0], [2, 0, 5]]), CLASSES[3], path, normalize=True))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_plot_reliability(tmp_path, n_classes):
    labels, probs = data(n_classes)
    path = tmp_path / "reliability.png"
    assert_png(path, plot_reliability(labels, probs, path, n_bins=10))


def test_plot_training_curves_with_and_without_validation(tmp_path):
    full = [{"epoch": e, "train_loss": 1 / (e + 1), "lr": 0.01 * e, "val_loss": 1.2 / (e + 1),
             "val_auroc": None if e == 0 else 0.6 + 0.05 * e, "val_accuracy": 0.5 + 0.05 * e,
             "images_per_second": 100.0} for e in range(5)]
    bare = [{"epoch": e, "train_loss": 1 / (e + 1), "lr": 0.01, "images_per_second": 100.0} for e in range(3)]
    for name, rows in {"full": full, "bare": bare, "empty": []}.items():
        path = tmp_path / f"{name}.png"
        assert_png(path, plot_training_curves(rows, path))


def test_plot_forest_with_and_without_intervals(tmp_path):
    rows = [{"label": "without-warmup", "difference": -0.02, "ci95": [-0.04, -0.001], "verdict": "hurts"},
            {"label": "without-mixup", "difference": 0.01, "ci95": [-0.01, 0.03], "verdict": "no detectable effect"},
            {"label": "one seed", "difference": 0.005, "ci95": [None, None]}]
    effects = {"Δ val AUROC": rows, "Δ val bal. acc.": rows[:2] + [{**rows[2], "verdict": "helps"}]}
    for name, panels in {"two": effects, "empty": {}}.items():
        path = tmp_path / f"{name}.png"
        assert_png(path, plot_forest(panels, path, title="demo"))


def test_robustness_plot_has_a_log_eps_axis_with_the_sweep_as_ticks_and_clean_lines(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    report = {"attack": "pgd", "norm": "linf", "targeted": False, "n": 10,
              "clean": {"accuracy": 0.9, "auroc": 0.95},
              "results": [{"eps": e / 255, "accuracy": a, "auroc": u} for e, a, u in
                          [(0.1, 0.8, 0.9), (0.5, 0.4, 0.6), (2, 0.1, 0.2), (8, 0.0, 0.0)]]}
    plots.plot_robustness(report, tmp_path / "r.png")
    (ax,) = figures[0].axes
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "0.5", "2", "8"]
    clean_lines = [line for line in ax.get_lines() if list(line.get_ydata()) in ([0.9, 0.9], [0.95, 0.95])]
    assert len(clean_lines) == 2  # the clean accuracy and AUROC, marked across the whole axis


def test_class_names_with_dollar_signs_are_drawn_as_text_not_parsed_as_formulas(tmp_path):
    """A label from a manifest ('$\\frac{x$') made matplotlib's mathtext raise after training, leaving the run
    unfinished; '$x$' would have been typeset as a formula."""
    labels, probs = data(2)
    names = ["$\\frac{x$", "$5 fee"]
    matrix = compute_metrics(labels, probs, n_boot=0)["confusion_matrix"]
    assert_png(tmp_path / "c.png", plot_confusion(matrix, names, tmp_path / "c.png"))
    assert_png(tmp_path / "r.png", plot_roc(labels, probs, names, tmp_path / "r.png"))


def test_file_names_that_are_not_utf8_are_drawn_with_their_bytes_escaped(tmp_path):
    """A title holding a file name with undecodable bytes (surrogates in Python) crashed FreeType inside savefig:
    `medtricks explain` on such a file exited with a traceback."""
    from medtricks.files import printable
    from medtricks.plots import plot_saliency

    assert printable("bad\udcff\udcfe.dcm") == "bad\\xff\\xfe.dcm" and printable("x\ud800") == "x\\ud800"
    assert printable("schädel.png") == "schädel.png"
    image, saliency = np.zeros((3, 8, 8), np.float32), np.random.default_rng(0).random((8, 8)).astype(np.float32)
    assert_png(tmp_path / "s.png", plot_saliency(image, saliency, tmp_path / "s.png", title="bad\udcff.dcm: normal"))


def test_plotting_leaves_a_notebooks_matplotlib_backend_as_it_was(tmp_path):
    """plots chose Agg with matplotlib.use on import: in a notebook, any medtricks call stopped the user's own inline
    plots from showing."""
    import subprocess
    import sys

    code = ("import sys, matplotlib, numpy as np; matplotlib.use('svg'); from medtricks import plots; "
            "plots.plot_roc(np.array([0, 1, 0, 1]), np.array([0.2, 0.7, 0.4, 0.9]), ['a', 'b'], sys.argv[1]); "
            "print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "roc.png")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["svg"] and (tmp_path / "roc.png").read_bytes().startswith(b"\x89PNG")


def test_many_classes_draw_a_bounded_figure_without_per_class_text(monkeypatch, tmp_path):
    """A mistaken label column (patient ids as classes) gave 200-300 classes: one text per confusion cell and a
    figure growing with the classes took minutes and 7 GB per plot, and training ended without a report. Above
    MAX_NAMED_CLASSES the plots draw no per-class text and stop growing; below it every cell is annotated."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    rng = np.random.default_rng(0)
    for k in (5, 300):
        names = [f"class_{c:03d}" for c in range(k)]
        labels = np.repeat(np.arange(k), 3)
        probs = rng.dirichlet(np.ones(k), len(labels))
        plots.plot_confusion(rng.integers(0, 5, (k, k)), names, tmp_path / "c.png")
        plots.plot_roc(labels, probs, names, tmp_path / "r.png")
    small_confusion, small_roc, many_confusion, many_roc = figures
    assert len(small_confusion.axes[0].texts) == 25 and small_roc.axes[0].get_legend() is not None
    assert len(many_confusion.axes[0].texts) == 0
    assert not any(t.get_text().startswith("class_") for t in many_confusion.axes[0].get_xticklabels())
    assert many_roc.axes[0].get_legend() is None
    assert max(many_confusion.get_size_inches()) <= 4 + 0.7 * plots.MAX_NAMED_CLASSES
