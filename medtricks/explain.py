"""Where does the model look? Saliency maps of a run's model: Grad-CAM, Grad-CAM++ and occlusion sensitivity.

MONAI computes the maps (monai.visualize.GradCAM, GradCAMpp, OcclusionSensitivity); written here is only what it
does not do: the target layer of each architecture, the class each map explains (the run's own decision, with its
validation threshold for binary tasks; multi-label: one finding's logit, by default the run's most confident
finding), one image at a time (MONAI's class score indexes a batch with a per-image class as a B x B matrix), a map
per image scaled to [0, 1] by its maximum (MONAI's default post-processing maps (min, max) to (1, 0)), overlays and
raw maps on disk, and two screens a reviewer asks for:

- sanity (Adebayo et al., NeurIPS 2018, "Sanity checks for saliency maps"): the maps again after randomizing the
  model's stages one by one from the head down (cascading randomization), with the Spearman rank correlation and
  SSIM to the original map; a method whose maps barely change once every stage is random does not explain the
  trained weights and is flagged;
- shortcuts (DeGrave et al., Nature Machine Intelligence 2021: COVID-19 radiograph models reading text markers and
  borders): the share of saliency mass in a border band and in the corners, against the share a uniform map puts
  there, and the share of images whose peak lies outside the central region. A screen, not a proof: a flag says
  "look at these images", and a clean screen does not show the model is free of shortcuts.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.metrics import SSIMMetric
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from scipy.stats import spearmanr
from torch import nn

from medtricks.data.images import read_image
from medtricks.data.sources import image_inputs
from medtricks.data.transforms import create_eval_transform
from medtricks.errors import DataError, MedtricksError, short
from medtricks.files import atomic_write, check_output, new_folder, write_json
from medtricks.metrics import decisions
from medtricks.models.backbones import ARCHS, MedModel
from medtricks.multilabel import label_name
from medtricks.runs import Run, open_run
from medtricks.tta import unwrap

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++", "occlusion")
# what write_explanations puts in its folder: an --overwrite removes an earlier explain's files before adding its own
EARLIER_OUTPUTS = re.compile(rf"\d{{4,}}-.*-({'|'.join(map(re.escape, METHODS))})\.(png|npy)"
                             r"|explain\.json|shortcuts\.png")
BORDER = 0.1  # the border band: the outer 10% of the side on each edge
CORNER = 0.15  # each corner square: 15% of the side, where text markers and lead letters sit
CENTRAL = 0.6  # the central region: the middle 60% of each side
# flags (stated before any data was screened): mass density at least twice a uniform map's, or peaks outside the
# central region in at least half of the images
SHORTCUT_DENSITY, SHORTCUT_PEAKS = 2.0, 0.5
SANITY_RHO = 0.5  # a map whose rank correlation with the trained model's stays at or above this once all is random


class ExplainError(MedtricksError):
    """A method, class, layer or model that cannot be explained."""


def cam_layer(model: MedModel) -> str:
    """The default Grad-CAM layer: the output of the last stage before `head` (layer4 of a ResNet, denseblock4 of a
    DenseNet, blocks.6 of an EfficientNet). Not a layer of the head itself: torchvision's DenseNet applies an
    in-place ReLU to norm5's output, which a backward hook there cannot see through."""
    stages = [name for name in ARCHS[model.arch].stages if name != "head"]
    return f"backbone.{ARCHS[model.arch].stages[stages[-1]][-1]}"


def _layer(model: MedModel, layer: str | None) -> str:
    if layer is None:
        return cam_layer(model)
    names = dict(model.named_modules())
    for candidate in (layer, f"backbone.{layer}"):
        if candidate in names:
            return candidate
    raise ExplainError(f"--layer {short(layer)} is not a module of {model.arch}; give a module name such as one of "
                       f"its stage paths: {_stage_paths(model)}.")


def _stage_paths(model: MedModel) -> str:
    """The module paths of the architecture's stages, for messages about --layer."""
    return ", ".join(f"backbone.{p}" for stage in ARCHS[model.arch].stages.values() for p in stage)


def _scaled(maps: torch.Tensor) -> np.ndarray:
    """(B, H, W) maps each divided by its maximum (a map that is 0 everywhere stays 0), float32 in [0, 1]."""
    maps = maps.detach().float().clamp_min(0)
    peak = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-30), torch.zeros_like(maps)).cpu().numpy()


def activation(multilabel: bool):
    """What turns a run's logits into the probabilities a map explains: each finding's sigmoid (multi-label) or the
    classes' softmax."""
    return torch.sigmoid if multilabel else partial(torch.softmax, dim=-1)


class Explainer:
    """Saliency maps of one model by one method (hooks are registered once, so build one per model)."""

    def __init__(self, model: MedModel, method: str = "gradcam", layer: str | None = None, multilabel: bool = False):
        if method not in METHODS:
            raise ExplainError(f"--method {short(method)}: choose one of {', '.join(METHODS)}.")
        model = unwrap(model)  # a train.tta run: the network's maps of the image as it is, not of its flips
        if not isinstance(model, MedModel):
            raise ExplainError("explain takes a single model; an ensemble's maps would mix its members' attention "
                               "(explain each member run instead).")
        self.model, self.method = model.eval(), method
        self.activate = activation(multilabel)
        self.layer = _layer(model, layer) if method != "occlusion" else None
        identity = lambda x: x  # noqa: E731  (MONAI's default post-processing flips the map: we scale it ourselves)
        if method == "gradcam":
            self._cam = GradCAM(model, self.layer, postprocessing=identity)
        elif method == "gradcam++":
            self._cam = GradCAMpp(model, self.layer, postprocessing=identity)
        else:
            self._cam = None  # built at the first image: its mask is 1/8 of the image side

    def _grad_cam(self, x: torch.Tensor, cls: int) -> torch.Tensor:
        try:
            return self._cam(x, class_idx=cls)[0, 0]
        except (ValueError, IndexError, RuntimeError) as exc:  # MONAI's errors where the layer gives no map
            if self.layer == cam_layer(self.model):
                raise
            raise ExplainError(f"--layer {short(self.layer)}: Grad-CAM cannot read a spatial feature map and its "
                               f"gradient there ({str(exc).splitlines()[0][:120]}); give a convolutional stage, such "
                               f"as one of {_stage_paths(self.model)}.") from exc

    def __call__(self, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        """(B, H, W) maps in [0, 1] of `images` (B, C, H, W) in [0, 1], each for its class in `classes`."""
        maps = []
        for image, cls in zip(images, classes, strict=True):
            x = image[None]
            if self.method == "occlusion":
                if self._cam is None:
                    self._cam = OcclusionSensitivity(self.model, mask_size=max(4, x.shape[-1] // 8), n_batch=16,
                                                     verbose=False, mode="mean_img", overlap=0.5,
                                                     activate=self.activate)
                with torch.no_grad():
                    base = self.activate(self.model(x).float())[0, cls]
                    occluded, _ = self._cam(x)  # (1, classes, H, W): the class probability with each region hidden
                maps.append((base - occluded[0, cls]).clamp_min(0))
            else:
                maps.append(self._grad_cam(x, int(cls)))
        return _scaled(torch.stack(maps))


def decided_classes(run: Run, images: torch.Tensor) -> tuple[list[int], np.ndarray]:
    """The class each image's map explains and the probabilities: the run's decision (validation threshold for binary
    tasks, argmax otherwise); multi-label, the finding whose sigmoid lies furthest above its validation threshold
    (the most confident finding; with none found, the one closest to being found)."""
    with torch.no_grad():
        probs = activation(run.multilabel)(run.model(images.to(run.device)).float()).cpu().numpy()
    if run.multilabel:
        thresholds = np.full(probs.shape[1], 0.5) if run.threshold is None else np.asarray(run.threshold)
        return (probs - thresholds).argmax(axis=1).tolist(), probs
    return decisions(probs, run.threshold).tolist(), probs


def region_masks(side: int) -> dict[str, np.ndarray]:
    """Boolean (side, side) masks of the border band, the four corners and the central region."""
    index = np.arange(side)
    band, corner = max(1, round(BORDER * side)), max(1, round(CORNER * side))
    edge = (index < band) | (index >= side - band)
    near = (index < corner) | (index >= side - corner)
    lo, hi = round((1 - CENTRAL) / 2 * side), round((1 + CENTRAL) / 2 * side)
    middle = (index >= lo) & (index < hi)
    return {"border": edge[:, None] | edge[None, :], "corners": near[:, None] & near[None, :],
            "central": middle[:, None] & middle[None, :]}


def shortcut_screen(maps: np.ndarray) -> dict:
    """Saliency mass in the border band and corners against a uniform map's share, and peaks outside the centre.

    Returns:
        {"border_density", "corner_density": mean over images of (mass share / area share), so 1 = as uniform;
        "peaks_outside_central": share of images whose peak lies outside the central region; "flagged": bool;
        "most_border_focused": indices of the images with the largest border share, most first; "note"}.
    """
    side = maps.shape[-1]
    masks = region_masks(side)
    mass = maps.reshape(len(maps), -1).sum(1)
    valid = mass > 0
    density = {}
    for name in ("border", "corners"):
        share = maps[:, masks[name]].sum(1) / np.where(valid, mass, 1)
        density[name] = (share / masks[name].mean(), share)
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
    outside = np.array([not masks["central"][p] for p in peaks]) & valid
    result = {"border_density": float(density["border"][0][valid].mean()) if valid.any() else None,
              "corner_density": float(density["corners"][0][valid].mean()) if valid.any() else None,
              "peaks_outside_central": float(outside.mean()), "images": int(len(maps)),
              "most_border_focused": np.argsort(-density["border"][1]).tolist()[:8]}
    result["flagged"] = bool(valid.any() and (result["corner_density"] >= SHORTCUT_DENSITY
                                              or result["border_density"] >= SHORTCUT_DENSITY
                                              or result["peaks_outside_central"] >= SHORTCUT_PEAKS))
    result["note"] = ("a screen, not a proof: flagged means the maps dwell on the border, corners or outside the "
                      "centre, where markers, text and positioning cues sit; look at the listed images. A clean screen "
                      "does not show the model is free of shortcuts.")
    return result


def _randomize(module: nn.Module, seed: int) -> None:
    """Re-initialize every parameterized submodule of `module` as at construction (seeded)."""
    torch.manual_seed(seed)
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(sub.weight, 1.0, 0.1)
            nn.init.normal_(sub.bias, 0.0, 0.1)


def sanity_check(model: MedModel, images: torch.Tensor, classes: Sequence[int], method: str = "gradcam",
                 layer: str | None = None, seed: int = 0, multilabel: bool = False) -> dict:
    """Cascading randomization (Adebayo et al. 2018): the maps after randomizing the stages from the head down
    (`multilabel`: `classes` are findings; occlusion reads their sigmoids).

    Returns:
        {"steps": [{"randomized": [stages], "spearman", "ssim"}], "head_only": {...}, "flagged", "note"}: the mean
        over images of the Spearman rank correlation and SSIM between each step's maps and the trained model's.
    """
    model = unwrap(model)  # a train.tta run: the network itself (Explainer's maps are of it)
    original = Explainer(model, method, layer, multilabel)(images, classes)
    stages = list(ARCHS[model.arch].stages)[::-1]  # head first

    def compare(randomized: MedModel) -> dict:
        maps = Explainer(randomized, method, layer, multilabel)(images, classes)
        rho = [r for a, b in zip(original, maps, strict=True) if (r := _spearman(a, b)) is not None]
        ssim = SSIMMetric(spatial_dims=2, data_range=1.0)(torch.from_numpy(maps)[:, None],
                                                          torch.from_numpy(original)[:, None])
        return {"spearman": float(np.mean(rho)) if rho else None, "ssim": float(ssim.mean())}

    steps, randomized = [], copy.deepcopy(model)
    for k, stage in enumerate(stages):
        for module in randomized.stage_modules([stage]):
            _randomize(module, seed + k)
        steps.append({"randomized": stages[:k + 1], **compare(randomized)})
    head_only = copy.deepcopy(model)
    for module in head_only.stage_modules([stages[0]]):
        _randomize(module, seed)
    last = steps[-1]["spearman"]
    return {"method": method, "steps": steps, "head_only": compare(head_only),
            "flagged": bool(last is not None and last >= SANITY_RHO),
            "note": f"flagged when the maps of the fully randomized model still correlate with the trained model's "
                    f"(Spearman >= {SANITY_RHO}): then the maps do not depend on what the model learned."}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation of two maps: None when both are constant (nothing to compare), 0 when one is (the other's
    ranking is lost)."""
    if a.std() == 0 and b.std() == 0:
        return None
    return float(spearmanr(a.ravel(), b.ravel()).statistic) if a.std() > 0 and b.std() > 0 else 0.0


def attention_shift(model: MedModel, examples: Sequence[tuple], classes: Sequence[str], path: str | Path,
                    method: str = "gradcam", multilabel: bool = False) -> list[dict]:
    """Does an attack move the model's attention? The map of each attack example's true class on the clean and on
    the adversarial image (`attack --explain`), side by side in `path`, with their rank correlation.

    `multilabel` examples (label and decisions are multi-hot tuples) map one finding each, named in the row's
    "finding": the first whose decision the attack flipped, else the first present, else the first (_mapped_finding).

    Args:
        examples: (clean (C, H, W), adversarial (C, H, W), label, clean prediction, adversarial prediction), as
            medtricks.robustness.run_attack keeps them.
    """
    from medtricks import plots

    if not examples:
        return []
    device = next(model.parameters()).device
    mapped = [_mapped_finding(*e[2:5]) if multilabel else int(e[2]) for e in examples]
    explainer = Explainer(model, method, multilabel=multilabel)
    clean = explainer(torch.stack([e[0] for e in examples]).to(device), mapped)
    adversarial = explainer(torch.stack([e[1] for e in examples]).to(device), mapped)
    rows = [{"label": label_name(e[2], classes), "clean_prediction": label_name(e[3], classes),
             "adversarial_prediction": label_name(e[4], classes), **({"finding": classes[k]} if multilabel else {}),
             "spearman": _spearman(a, b)} for k, e, a, b in zip(mapped, examples, clean, adversarial, strict=True)]
    titles = [(f"map of {r['finding']}; " if multilabel else "")
              + f"{r['label']}: {r['clean_prediction']} -> {r['adversarial_prediction']}, Spearman "
              + ("n/a (both maps empty)" if r["spearman"] is None else f"{r['spearman']:.2f}") for r in rows]
    plots.plot_attention_shift([e[0].numpy() for e in examples], [e[1].numpy() for e in examples], clean,
                               adversarial, titles, path, method)
    return rows


def _mapped_finding(label: Sequence[int], clean: Sequence[int], adversarial: Sequence[int]) -> int:
    """The finding whose maps show a multi-label attack's effect: the first whose decision it flipped, else the first
    the image has, else the first."""
    flipped = [k for k, (before, after) in enumerate(zip(clean, adversarial, strict=True)) if before != after]
    present = [k for k, on in enumerate(label) if on]
    return (flipped or present or [0])[0]


@dataclass
class Explained:
    """Maps (B, H, W) in [0, 1] at the model's input size, the images they explain (B, C, H, W), the class index and
    name each map explains, the probabilities, the paths, and the files that could not be read."""

    maps: np.ndarray
    images: np.ndarray
    classes: list[int]
    class_names: list[str]
    probabilities: np.ndarray
    paths: list[str]
    unreadable: list[dict]


def load_images(run: Run, inputs: Sequence[str | Path]) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The run's eval transform of every readable image (files or folders); unreadable ones listed, not dropped."""
    files = image_inputs(inputs)
    transform = create_eval_transform(run.info["image_size"], run.info["crop_fraction"])
    images, paths, unreadable = [], [], []
    for path in files:
        try:
            pixels, _ = read_image(path, run.info["channels"])
            images.append(transform(torch.from_numpy(pixels)))
            paths.append(str(path))
        except DataError as exc:
            unreadable.append({"path": str(path), "error": str(exc)})
    if not images:
        raise DataError(f"none of the {len(files)} image file(s) could be read: {unreadable[0]['error']}")
    return torch.stack(images), paths, unreadable


def explain(run: str | Path | Run, inputs: Sequence[str | Path], method: str = "gradcam",
            target_class: str | None = None, layer: str | None = None, device: str | None = None) -> Explained:
    """Saliency maps of a run's model for image files or folders, as arrays (the Python API of `medtricks explain`).

    Args:
        run: a finished run directory (or an opened Run).
        inputs: image files or folders (recursively).
        method: gradcam, gradcam++ or occlusion.
        target_class: the class to explain (a name of the run's classes; multi-label: a finding); None = the run's
            decision per image (multi-label: its most confident finding, decided_classes).
        layer: Grad-CAM layer (a module name); None = cam_layer.
        device: auto, cpu, cuda or cuda:N (default: the recipe's).
    """
    opened = run if isinstance(run, Run) else open_run(run, device)
    images, paths, unreadable = load_images(opened, inputs)
    decided, probs = decided_classes(opened, images)
    if target_class is not None:
        if target_class not in opened.classes:
            raise ExplainError(f"--class {short(target_class)} is not one of the run's classes "
                               f"{list(opened.classes)}.")
        decided = [opened.classes.index(target_class)] * len(paths)
    maps = Explainer(opened.model, method, layer, opened.multilabel)(images.to(opened.device), decided)
    return Explained(maps, images.numpy(), decided, [opened.classes[c] for c in decided], probs, paths, unreadable)


def _save_map(path: Path, saliency: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, saliency.astype(np.float32), allow_pickle=False)

    atomic_write(path, write)


def explain_split(run: Run, split: str = "test", data: str | Path | None = None, method: str = "gradcam",
                  layer: str | None = None, gallery: str | Path | None = None) -> dict:
    """The shortcut screen over every image of a split (`evaluate --explain-summary`), each map for the run's own
    decision; with `gallery`, a PNG of the most border-focused images."""
    from medtricks import plots

    dataset = run.dataset(data, split)
    explainer = Explainer(run.model, method, layer, run.multilabel)
    images, maps, decided = [], [], []
    for batch in run.loader(dataset):
        pixels = batch["image"].to(run.device)
        classes, _ = decided_classes(run, pixels)
        maps.append(explainer(pixels, classes))
        images.append(batch["image"].numpy())
        decided.extend(classes)
    maps, images = np.concatenate(maps), np.concatenate(images)
    screen = {"split": split, "method": method, **shortcut_screen(maps)}
    keys = [dataset.store.records[i]["key"] for i in dataset.indices]
    screen["most_border_focused"] = [str(keys[i]) for i in screen["most_border_focused"]]
    if gallery is not None:
        top = [keys.index(k) for k in screen["most_border_focused"]]
        plots.plot_saliency_gallery(images[top], maps[top], [f"{keys[i]}: {run.classes[decided[i]]}" for i in top],
                                    gallery)
        screen["gallery"] = str(gallery)
    return screen


def write_explanations(result: Explained, out: str | Path, method: str, overwrite: bool = False,
                       extra: dict | None = None) -> Path:
    """Overlays (PNG) and raw maps (.npy, float32, no pickle) per image, and explain.json, into the folder `out`."""
    from medtricks import plots

    out = check_output(out, overwrite, "--out", folder=True)
    # a new folder is filled under a temporary name: an interrupted explain leaves no half of one
    with new_folder(out, EARLIER_OUTPUTS) as folder:
        rows = []
        for i, path in enumerate(result.paths):
            stem = f"{i:04d}-{Path(path).stem[:100]}"  # the index keeps names unique; the cut keeps them legal
            _save_map(folder / f"{stem}-{method}.npy", result.maps[i])
            plots.plot_saliency(result.images[i], result.maps[i], folder / f"{stem}-{method}.png",
                                title=f"{Path(path).name}: {result.class_names[i]} "
                                      f"(p = {result.probabilities[i, result.classes[i]]:.3f}), {method}")
            peak = np.unravel_index(int(np.argmax(result.maps[i])), result.maps[i].shape)
            rows.append({"path": path, "class": result.class_names[i],
                         "probability": float(result.probabilities[i, result.classes[i]]),
                         "peak": [int(peak[0]), int(peak[1])], "map": f"{stem}-{method}.npy",
                         "overlay": f"{stem}-{method}.png"})
        screen = (extra or {}).get("shortcuts")
        if screen is not None:  # the images to look at first
            top = screen["most_border_focused"]
            plots.plot_saliency_gallery(result.images[top], result.maps[top],
                                        [f"{Path(result.paths[i]).name}: {result.class_names[i]}" for i in top],
                                        folder / "shortcuts.png")
        write_json(folder / "explain.json", {"method": method, "images": rows, "unreadable": result.unreadable,
                                             **(extra or {})})
    return out
