"""PNG plots of a run: ROC curves, confusion matrix, reliability diagram and training curves.

Each function writes one PNG (parent folders created) and returns the path. Figures are made without pyplot and drawn
with Agg, so plotting works on headless machines and inside the training loop and leaves a notebook's own matplotlib
backend as it was. Plots never show patient ids: no function takes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import NullFormatter
from sklearn.metrics import roc_auc_score, roc_curve

from medtricks.files import atomic_write, printable
from medtricks.metrics import calibration_bins, check_probs
from medtricks.multilabel import label_name

logger = logging.getLogger(__name__)

_DPI = 120
# Above this many classes a plot draws no per-class text (cell counts, legend entries, tick names): the text, not
# the pixels, made a 200-class confusion matrix take minutes and gigabytes; the figure stops growing there too.
MAX_NAMED_CLASSES = 30


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    for text in fig.findobj(Text):  # class and file names are data: '$x$' is no formula (and '$\\frac{x$' no error)
        text.set_parse_math(False)
        text.set_text(printable(text.get_text()))  # a file name that is not UTF-8
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=_DPI, bbox_inches="tight", format="png"))
    return path


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], layout: str | None = None, **kwargs):
    """plt.subplots without pyplot, which would switch a notebook's backend (inline plots stop showing) and keep every
    figure in its registry; a bare Figure draws with Agg when saved."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _check_classes(classes: Sequence[str], n_classes: int) -> list[str]:
    if len(classes) != n_classes:
        raise ValueError(f"classes must name all {n_classes} classes of probs/matrix; got {len(classes)}: "
                         f"{list(classes)}.")
    return [str(c) for c in classes]


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path,
             threshold: float | None = None) -> Path:
    """ROC curve(s) with AUROC in the legend.

    Args:
        labels: (N,) class indices in [0, C).
        probs: (N, C) probabilities (or (N,) positive-class probability for a binary task).
        classes: the C class names, in index order.
        path: the PNG to write.
        threshold: binary only: the operating threshold in [0, 1] to mark on the curve (None = no marker).

    Returns:
        path. Binary: one curve for class 1 (index 1 positive). Multi-class: one one-vs-rest curve per class that
        has both positive and negative images; classes without them are listed in the title instead.
    """
    y, p = check_probs(labels, probs)
    names = _check_classes(classes, p.shape[1])
    binary = p.shape[1] == 2
    if threshold is not None and not binary:
        raise ValueError(f"threshold applies to binary tasks only; this task has {p.shape[1]} classes.")
    fig, ax = _subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    skipped = []
    for c in [1] if binary else range(p.shape[1]):
        positive = y == c
        if positive.all() or not positive.any():
            skipped.append(names[c])
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        auroc = roc_auc_score(positive, p[:, c])
        label = f"AUROC {auroc:.3f}" if binary else f"{names[c]} vs rest (AUROC {auroc:.3f})"
        ax.plot(fpr, tpr, linewidth=1.8, label=label)
        if threshold is not None:
            decided = p[:, 1] >= threshold
            sens, fpr_t = decided[positive].mean(), decided[~positive].mean()
            ax.plot([fpr_t], [sens], marker="o", color="black", linestyle="none",
                    label=f"threshold {threshold:.3g}: sens {sens:.2f}, spec {1 - fpr_t:.2f}")
    title = f"ROC: {names[1]} vs {names[0]}" if binary else "ROC, one vs rest"
    if skipped:
        logger.warning("plot_roc: no ROC curve for %s (every or no image of the class in the labels).", skipped)
        title += "\n(undefined: only one class present)" if binary else (
            f"\n(no curve: {', '.join(skipped)})" if len(skipped) <= 5 else f"\n(no curve for {len(skipped)} classes)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=title)
    ax.set_aspect("equal")
    if len(names) <= MAX_NAMED_CLASSES:
        ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_confusion(matrix: list[list[int]] | np.ndarray, classes: Sequence[str], path: str | Path,
                   normalize: bool = False) -> Path:
    """Confusion matrix, rows = true class, columns = predicted class, each cell annotated with its count.

    Args:
        matrix: (C, C) image counts, as in compute_metrics()["confusion_matrix"].
        classes: the C class names, in index order.
        path: the PNG to write.
        normalize: colour by the fraction of each true class (row) in [0, 1] and show it under the count.

    Returns:
        path.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"matrix must be square (C, C); got shape {counts.shape}.")
    names = _check_classes(classes, counts.shape[0])
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    shown = fractions if normalize else counts
    named = len(names) <= MAX_NAMED_CLASSES
    size = 2.5 + 0.7 * min(len(names), MAX_NAMED_CLASSES)
    fig, ax = _subplots(figsize=(size + 1, size))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, counts.max()))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "images")
    high = (1 if normalize else max(1, counts.max())) / 2
    for i in range(counts.shape[0]) if named else ():
        for j in range(counts.shape[1]):
            text = f"{counts[i, j]:g}\n{fractions[i, j]:.0%}" if normalize else f"{counts[i, j]:g}"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="white" if shown[i, j] > high else "black")
    if named:
        ticks = np.arange(len(names))
        ax.set_xticks(ticks, names, rotation=45 if max(map(len, names)) > 6 else 0, ha="right")
        ax.set_yticks(ticks, names)
    title = f"Confusion matrix (n = {counts.sum():g})"
    if not named:
        title += f"\n{len(names)} classes in label order, unnamed (counts in report.json)"
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    return _save(fig, path)


def plot_reliability(labels: np.ndarray, probs: np.ndarray, path: str | Path, n_bins: int = 15) -> Path:
    """Reliability diagram (Guo et al. 2017): accuracy vs top-label confidence per bin, with the ECE in the title.

    Args:
        labels: (N,) class indices in [0, C).
        probs: (N, C) probabilities (or (N,) positive-class probability for a binary task).
        path: the PNG to write.
        n_bins: equal-width confidence bins over [0, 1], as in expected_calibration_error.

    Returns:
        path. Empty bins have no bar; hatched red bars show the gap between accuracy and mean confidence; a lower
        panel shows the number of images per bin.
    """
    counts, accuracy, confidence = calibration_bins(labels, probs, n_bins)
    ece = float(np.sum(counts / counts.sum() * np.abs(accuracy - confidence)))
    filled = counts > 0
    centres = (np.arange(n_bins) + 0.5) / n_bins
    width = 1.0 / n_bins
    fig, (ax, hist) = _subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[filled], accuracy[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centres[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width,
           facecolor="none", edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE = {ece:.3f}, {n_bins} bins)")
    ax.legend(loc="upper left", fontsize="small")
    hist.bar(centres, counts, width=width, edgecolor="black", color="lightgrey")
    hist.set(xlabel="confidence (top-label probability)", ylabel="images")
    return _save(fig, path)


def _show_image(ax, image: np.ndarray, saliency: np.ndarray | None = None) -> None:
    """Draw a (C, H, W) image in [0, 1] (grey or colour), with a saliency map (H, W) in [0, 1] on top if given."""
    image = np.asarray(image)
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    ax.imshow(np.clip(shown, 0, 1), cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1)
    if saliency is not None:
        ax.imshow(saliency, cmap="jet", alpha=0.45, vmin=0, vmax=1)


def plot_saliency(image: np.ndarray, saliency: np.ndarray, path: str | Path, title: str = "") -> Path:
    """The image (C, H, W) in [0, 1] as the model saw it, beside it with the saliency map (H, W) in [0, 1] on top."""
    fig, axes = _subplots(1, 2, figsize=(8, 4.3))
    for ax in axes:
        ax.axis("off")
    _show_image(axes[0], image)
    _show_image(axes[1], image, saliency)
    fig.colorbar(axes[1].images[-1], ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize="small")
    return _save(fig, path)


def plot_saliency_gallery(images: np.ndarray, maps: np.ndarray, titles: Sequence[str], path: str | Path) -> Path:
    """A grid of images (N, C, H, W) with their saliency maps (N, H, W) on top, e.g. the most border-focused."""
    cols = 4
    rows = max(1, -(-len(images) // cols))
    fig, axes = _subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, saliency, title in zip(axes.ravel(), images, maps, titles, strict=False):
        _show_image(ax, image, saliency)
        ax.set_title(title, fontsize=7)
    return _save(fig, path)


def plot_attention_shift(clean: Sequence[np.ndarray], adversarial: Sequence[np.ndarray], clean_maps: np.ndarray,
                         adversarial_maps: np.ndarray, titles: Sequence[str], path: str | Path, method: str) -> Path:
    """One row per attack example: the clean image with its saliency map, the adversarial image with its map."""
    rows = len(clean)
    fig, axes = _subplots(rows, 2, figsize=(6, 3 * rows + 0.4), squeeze=False, layout="constrained")
    for row in range(rows):
        for col, (image, saliency, name) in enumerate(((clean[row], clean_maps[row], "clean"),
                                                       (adversarial[row], adversarial_maps[row], "adversarial"))):
            ax = axes[row, col]
            _show_image(ax, image, saliency)
            ax.set_title(f"{name}, {method}" + (f"\n{titles[row]}" if col == 0 else ""), fontsize=7)
            ax.axis("off")
    return _save(fig, path)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the rows that have a non-None value for key."""
    pairs = [(row.get("epoch", i), row[key]) for i, row in enumerate(rows) if row.get(key) is not None]
    return [float(e) for e, _ in pairs], [float(v) for _, v in pairs]


def plot_training_curves(rows: list[dict], path: str | Path) -> Path:
    """Losses, validation AUROC/accuracy and learning rate against epoch, from the lines of metrics.jsonl.

    Args:
        rows: one dict per epoch with "epoch", "train_loss", "lr" and optionally "val_loss", "val_auroc" (may be
            None), "val_accuracy"; missing keys and None values are skipped.
        path: the PNG to write.

    Returns:
        path.
    """
    fig, axes = _subplots(1, 3, figsize=(14, 4))
    panels = [
        (axes[0], ["train_loss", "val_loss"], "loss"),
        (axes[1], ["val_auroc", "val_accuracy"], "validation metric"),
        (axes[2], ["lr"], "learning rate"),
    ]
    for ax, keys, ylabel in panels:
        drawn = False
        for key in keys:
            epochs, values = _series(rows, key)
            if values:
                ax.plot(epochs, values, marker="o" if len(values) < 30 else None, markersize=3, label=key)
                drawn = True
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {' / '.join(keys)} recorded", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1.02)
    fig.suptitle(f"Training curves ({len(rows)} epochs)")
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness(report: dict, path: str | Path) -> Path:
    """Accuracy and AUROC versus eps on a log axis (sweeps span 0.1/255 to 8/255 and most of the change is below
    1/255), with the clean values as dotted lines."""
    linf = report["norm"] == "linf"
    eps = [r["eps"] * (255 if linf else 1) for r in report["results"]]
    fig, ax = _subplots(figsize=(5.5, 4))
    series = [("accuracy", "o-", "C0"), ("auroc", "s--", "C1")]
    for key, style, color in series:
        values, clean = [r[key] for r in report["results"]], report["clean"][key]
        if clean is None or None in values:
            continue
        name = "AUROC" if key == "auroc" else key
        ax.plot(eps, values, style, color=color, label=f"{name} under attack")
        ax.axhline(clean, color=color, linestyle=":", linewidth=1.2, label=f"{name} clean ({clean:.3f})")
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:.2g}" for e in eps])  # the sweep's own eps, not log decades
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("eps (x 1/255 of the intensity range, log scale)" if linf else
                  "eps (L2 norm of the perturbation in [0, 1] units, log scale)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{report['attack'].upper()} {report['norm']}"
                 f"{', targeted' if report['targeted'] else ''}, n={report['n']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_adversarial_examples(examples: list, classes, path: str | Path, eps: float) -> Path:
    """Rows of clean image / perturbation (amplified to the full range) / adversarial image, with predictions.

    `examples` holds (clean (C,H,W), adversarial (C,H,W), label, clean prediction, adversarial prediction), each
    label a class index or a multi-hot tuple (shown as its findings joined by +)."""
    rows = max(len(examples), 1)
    fig, axes = _subplots(rows, 3, figsize=(7.5, 2.3 * rows + 0.4), squeeze=False, layout="constrained")
    for row, (clean, adv, label, pred, adv_pred) in enumerate(examples):
        delta = (adv - clean).numpy()
        scale = max(float(np.abs(delta).max()), 1e-12)
        panels = [(clean.numpy(), f"clean: {label_name(pred, classes)} (true {label_name(label, classes)})"),
                  (0.5 + 0.5 * delta / scale, f"perturbation x{0.5 / scale:.0f}"),
                  (adv.numpy(), f"adversarial: {label_name(adv_pred, classes)}")]
        for col, (image, title) in enumerate(panels):
            _show_image(axes[row, col], image)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    fig.suptitle(f"eps = {eps * 255:.2g}/255", fontsize=10)
    return _save(fig, path)


def plot_forest(effects: dict[str, Sequence[dict]], path: str | Path, title: str | None = None) -> Path:
    """Forest plot: one panel per metric, one row per variant with its effect and 95% interval, a line at 0.

    Args:
        effects: {panel title (e.g. "Δ val AUROC"): rows {"label", "difference", "ci95": [lo, hi] (None, None when
            undefined), "verdict" (optional: "helps" green, "hurts" red, else grey)}}, rows drawn top to bottom.
        path: the PNG to write.
        title: figure title.

    Returns:
        path. A row without an interval is drawn as a hollow marker.
    """
    colours = {"helps": "tab:green", "hurts": "tab:red"}
    panels = list(effects.items()) or [("no effects", [])]
    n_rows = max((len(rows) for _, rows in panels), default=0)
    fig, axes = _subplots(1, len(panels), figsize=(4.5 * len(panels) + 1.5, 1.2 + 0.45 * max(n_rows, 1)),
                          squeeze=False, sharey=True)
    for ax, (name, rows) in zip(axes[0], panels, strict=True):
        for y, row in enumerate(rows):
            colour = colours.get(row.get("verdict"), "grey")
            lo, hi = row["ci95"]
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [y, y], color=colour, linewidth=2)
                ax.plot([row["difference"]], [y], "o", color=colour)
            else:
                ax.plot([row["difference"]], [y], "o", markerfacecolor="none", color=colour)
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)), [str(row["label"]) for row in rows])
        ax.set_ylim(len(rows) - 0.5 if rows else 0.5, -0.5)
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    if not any(rows for _, rows in panels):
        axes[0, 0].text(0.5, 0.5, "nothing to compare", ha="center", va="center", transform=axes[0, 0].transAxes,
                        color="grey")
    fig.suptitle(title or "Effect vs reference (95% interval)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_corruptions(report: dict, path: str | Path, against: dict | None = None) -> Path:
    """Accuracy versus corruption severity (0 = clean), one thin line per corruption and their mean as a thick line.

    Args:
        report: a medtricks.corruption_report.evaluate_corruptions result ("clean", "results", "n", "mce"; "run"
            optional).
        path: the PNG to write.
        against: another such report (e.g. the baseline run): its mean is drawn dashed, labelled with its "run".

    Returns:
        path.
    """
    fig, ax = _subplots(figsize=(6.5, 4.5))

    def curves(rep: dict) -> tuple[list[int], dict[str, list[float]]]:
        severities = sorted({r["severity"] for r in rep["results"]})
        by_name: dict[str, list[float]] = {}
        for r in sorted(rep["results"], key=lambda r: r["severity"]):
            by_name.setdefault(r["corruption"], [rep["clean"]["accuracy"]]).append(r["accuracy"])
        return [0, *severities], by_name

    x, by_name = curves(report)
    for name, accuracy in by_name.items():
        ax.plot(x, accuracy, marker="o", markersize=3, linewidth=1, alpha=0.7, label=name)
    ax.plot(x, np.mean(list(by_name.values()), axis=0), color="black", linewidth=3,
            label=f"mean ({report.get('run') or 'this run'})")
    if against is not None:
        x_other, other = curves(against)
        ax.plot(x_other, np.mean(list(other.values()), axis=0), color="black", linewidth=2, linestyle="--",
                label=f"mean ({against.get('run') or 'other run'})")
    ax.set_xticks(x, ["clean" if s == 0 else str(s) for s in x])
    ax.set(xlabel="severity", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"Accuracy under corruptions (n = {report['n']}, mCE = {report['mce']:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_corruption_gallery(gallery: dict, path: str | Path) -> Path:
    """One image under every corruption: rows = corruptions, columns = clean then each severity.

    Args:
        gallery: evaluate_corruptions()["gallery"]: {"clean": (C, H, W), "images": {name: [(C, H, W) per severity]},
            "severities" (optional, default 1, 2, ...)} of tensors or arrays in [0, 1].
        path: the PNG to write.

    Returns:
        path. Grey images are drawn with a grey colour map on a fixed [0, 1] range, so brightness changes show.
    """
    rows = list(gallery["images"].items())
    n_cols = 1 + max((len(images) for _, images in rows), default=0)
    severities = gallery.get("severities") or list(range(1, n_cols))
    fig, axes = _subplots(max(len(rows), 1), n_cols, figsize=(1.6 * n_cols, 1.6 * max(len(rows), 1) + 0.3),
                             squeeze=False, layout="constrained")
    for row, (name, images) in enumerate(rows):
        for col, image in enumerate([gallery["clean"], *images]):
            ax = axes[row, col]
            _show_image(ax, image)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("clean" if col == 0 else f"severity {severities[col - 1]}", fontsize=8)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Corruptions of one image", fontsize=10)
    return _save(fig, path)
