"""`medtricks explain` (issue 19): Grad-CAM equals a hand computation, maps on every architecture and on grey and
colour input, the peak on a planted lesion, the shortcut screen on a planted corner marker (and not on a clean set),
the cascading-randomization sanity check, and the command's files and errors."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.explain import (
    Explainer,
    cam_layer,
    decided_classes,
    explain,
    region_masks,
    sanity_check,
    shortcut_screen,
)
from medtricks.finetune import finetune
from medtricks.models.backbones import ARCHS, MedModel, create_model
from medtricks.runs import open_run

runner = CliRunner()
SIZE = 128
TRAIN = ["data.image_size=128", "data.workers=0", "data.synth_if_missing=false", "train.epochs=4",
         "train.batch_size=16", "train.eval_batch_size=32", "train.lr=0.05", "data.augment=none", "data.channels=1",
         "data.crop_fraction=1.0", "tricks={}", "data.split.train=0.6", "data.split.val=0.2", "data.split.test=0.2"]


def planted_set(folder, kind: str, n: int = 160, seed: int = 0):
    """Grey 128 px images with noise. `lesion`: class 1 has a bright disk (radius 18) somewhere in the central
    region, class 0 none; returns the disk centres. `marker`: both classes have such disks at random (no
    information), and class 1 has a bright square marker in the top-left corner: the only signal."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rows, centres = [], {}
    for i in range(n):
        label = i % 2
        image = rng.normal(0.35, 0.06, (SIZE, SIZE))
        if kind == "marker" or label:
            cy, cx = rng.integers(38, 90, 2)
            image[(y - cy) ** 2 + (x - cx) ** 2 <= 18 ** 2] += 0.45 * (1 if kind == "lesion" else rng.uniform(0.5, 1))
            centres[f"img{i:03d}.png"] = (int(cy), int(cx))
        if kind == "marker" and label:
            image[4:16, 4:16] = 0.95
        name = f"img{i:03d}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        rows.append({"path": name, "label": ["absent", "present"][label], "patient_id": f"p{i}"})
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return centres


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion")
    centres = planted_set(root / "data", "lesion")
    run = finetune("demo", data=root / "data", out=root / "run",
                   overrides=[*TRAIN, "data.classes=[absent, present]"])
    return run, root / "data", centres


def test_gradcam_equals_a_hand_computation():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, in_chans=1, weights="none").eval()
    x = torch.rand(1, 1, 64, 64)
    saved = {}
    layer = model.get_submodule(cam_layer(model))
    handle = layer.register_forward_hook(lambda m, i, o: saved.update(a=o))
    logits = model(x)
    handle.remove()
    grad = torch.autograd.grad(logits[0, 2], saved["a"])[0]
    cam = F.relu((grad.mean((2, 3), keepdim=True) * saved["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    expected = (cam / cam.max()).detach().numpy()
    assert cam_layer(model) == "backbone.layer4"
    assert np.allclose(Explainer(model, "gradcam")(x, [2])[0], expected, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("channels", [1, 3])
def test_maps_on_every_architecture_and_grey_and_colour_input(arch, channels):
    weights = "imagenet" if arch == "efficientnet_lite0" else "none"  # the others' weights are not offline
    model = create_model(arch, num_classes=2, in_chans=channels, weights=weights).eval()
    x = torch.rand(2, channels, 64, 64)
    for method in ("gradcam", "gradcam++"):
        maps = Explainer(model, method)(x, [0, 1])
        assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.min() >= 0
        assert set(maps.max(axis=(1, 2)).tolist()) <= {0.0, 1.0}  # scaled by the peak (a random net may give 0)
        if weights == "imagenet":  # pretrained features (its new head is random, so one class's map may be 0)
            assert (maps.max(axis=(1, 2)) == 1).any()


def test_the_gradcam_peak_lies_on_the_planted_lesion(lesion_run):
    run, data, centres = lesion_run
    report = json.loads((run / "report.json").read_text())
    assert report["splits"]["test"]["auroc"] > 0.95  # the model found the lesion
    opened = open_run(run, device="cpu")
    test = opened.dataset(split="test")
    records = [test.store.records[i] for i in test.indices]
    positives = [data / r["key"] for r in records if r["label"] == 1]  # held-out images only
    result = explain(opened, positives, layer="blocks.4", target_class="present")  # stride 16: 8 x 8 cells
    # on the lesion, to the map's resolution: within its radius (18 px) plus half a map cell (8 px)
    inside = []
    for path, saliency in zip(result.paths, result.maps, strict=True):
        cy, cx = centres[path.rsplit("/", 1)[-1]]
        py, px = np.unravel_index(np.argmax(saliency), saliency.shape)
        inside.append(np.hypot(py - cy, px - cx))
    inside = np.array(inside) <= 18 + 8
    assert len(inside) >= 10 and np.mean(inside) >= 0.6, np.mean(inside)  # most (12 of 16 on 2 threads here)


def test_the_shortcut_screen_flags_a_corner_marker_and_not_a_clean_lesion(lesion_run, tmp_path):
    planted_set(tmp_path / "data", "marker", seed=1)
    marker_run = finetune("demo", data=tmp_path / "data", out=tmp_path / "run",
                          overrides=[*TRAIN, "data.classes=[absent, present]"])
    images = sorted((tmp_path / "data").glob("*.png"))[1:40:2]  # class 1: with the marker
    marker = shortcut_screen(explain(marker_run, images, target_class="present").maps)
    assert marker["flagged"], marker
    run, data, _ = lesion_run
    clean = shortcut_screen(explain(run, sorted(data.glob("*.png"))[1:40:2], target_class="present").maps)
    assert not clean["flagged"], clean


def test_region_masks_and_screen_arithmetic():
    masks = region_masks(100)
    assert masks["border"].mean() == pytest.approx(1 - 0.8 ** 2) and masks["corners"].sum() == 4 * 15 * 15
    uniform = np.ones((3, 100, 100))
    screen = shortcut_screen(uniform)
    assert screen["border_density"] == pytest.approx(1) and screen["corner_density"] == pytest.approx(1)
    corner = np.zeros((3, 100, 100))
    corner[:, :5, :5] = 1
    assert shortcut_screen(corner)["flagged"] and shortcut_screen(corner)["peaks_outside_central"] == 1


def test_gradcam_maps_fall_apart_when_the_stages_are_randomized(lesion_run):
    run, data, _ = lesion_run
    opened = open_run(run, device="cpu")
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)[None] / 255)
                          for p in sorted(data.glob("*.png"))[1:17:2]])
    check = sanity_check(opened.model, images, [1] * len(images), "gradcam")
    assert [s["randomized"][-1] for s in check["steps"]][:2] == ["head", "blocks.6"]
    assert check["steps"][-1]["spearman"] < 0.5 and not check["flagged"]  # the stated threshold
    assert {"spearman", "ssim"} <= set(check["head_only"])


def test_explain_command_writes_maps_and_refuses_what_it_should(lesion_run, tmp_path):
    run, data, _ = lesion_run
    images = sorted(data.glob("*.png"))[:3]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "maps"
    result = runner.invoke(app, ["explain", str(run), *map(str, images), str(tmp_path / "broken.png"), "--out",
                                 str(out), "--shortcuts", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "explain.json").read_text())
    assert len(summary["images"]) == 3 and summary["unreadable"][0]["path"].endswith("broken.png")
    saliency = np.load(out / summary["images"][0]["map"], allow_pickle=False)
    assert saliency.shape == (SIZE, SIZE) and (out / summary["images"][0]["overlay"]).is_file()
    assert "shortcuts" in summary and "unreadable" in result.output and (out / "shortcuts.png").is_file()
    again = runner.invoke(app, ["explain", str(run), str(images[0]), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
    unknown = runner.invoke(app, ["explain", str(run), str(images[0]), "--class", "nodule", "--out",
                                  str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "nodule" in unknown.output
    occlusion = runner.invoke(app, ["explain", str(run), str(images[1]), "--method", "occlusion", "--out",
                                    str(tmp_path / "occ")])
    assert occlusion.exit_code == 0, occlusion.output
    long = tmp_path / ("l" * 245 + ".png")  # a legal 249-byte name: the maps named after it must stay legal
    long.write_bytes(images[0].read_bytes())
    named = runner.invoke(app, ["explain", str(run), str(long), "--out", str(tmp_path / "long")])
    assert named.exit_code == 0 and len(list((tmp_path / "long").glob("0000-l*"))) == 2, named.output
    for layer in ("", "backbone.classifier", "backbone.global_pool", "normalize"):  # modules without a feature map
        flat = runner.invoke(app, ["explain", str(run), str(images[0]), "--layer", layer, "--out",
                                   str(tmp_path / "flat")])
        assert flat.exit_code == 2 and "cannot read a spatial feature map" in flat.output, (layer, flat.output)
        assert "Traceback" not in flat.output and "backbone.blocks.6" in flat.output


def test_attack_explain_maps_the_gallery_clean_and_adversarial(lesion_run):
    run, _, _ = lesion_run
    result = runner.invoke(app, ["attack", str(run), "--pgd", "--eps", "8/255", "--steps", "3", "--limit", "6",
                                 "--no-checks", "--explain", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    folder = sorted((run / "attacks").iterdir())[-1]
    report = json.loads((folder / "attack.json").read_text())
    rho = [row["spearman"] for row in report["explain"] if row["spearman"] is not None]  # None: both maps empty
    assert len(report["explain"]) == 6 and rho and all(-1 <= r <= 1 for r in rho)
    assert min(rho) < 0.999  # the adversarial images' maps are their own
    assert (folder / "explain.png").is_file() and "attention" in result.output


def test_evaluate_explain_summary_screens_a_whole_split(lesion_run, tmp_path, monkeypatch):
    run, _, _ = lesion_run
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", str(run), "--split", "test", "--explain-summary", "--device", "cpu",
                                 "--json", "m.json"])
    assert result.exit_code == 0, result.output
    screen = json.loads((tmp_path / "m.json").read_text())["explain_summary"]
    report = json.loads((run / "report.json").read_text())
    assert screen["images"] == report["splits"]["test"]["n"] and not screen["flagged"]
    assert len(screen["most_border_focused"]) == 8 and (tmp_path / screen["gallery"]).is_file()


def two_findings_set(folder, n: int = 200, seed: int = 0):
    """Grey 128 px images with two independent findings, each on about half of them: `disk` (a bright disk of
    radius 14 in the upper half) and `bar` (a dark horizontal band 10 px high in the lower half). Returns each
    image's disk centre and bar rows (None when absent)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rows, planted = [], {}
    for i in range(n):
        image = rng.normal(0.45, 0.05, (SIZE, SIZE))
        disk = bar = None
        if rng.random() < 0.5:
            disk = tuple(int(v) for v in (rng.integers(28, 50), rng.integers(30, 98)))
            image[(y - disk[0]) ** 2 + (x - disk[1]) ** 2 <= 14 ** 2] += 0.4
        if rng.random() < 0.5:
            top = int(rng.integers(80, 100))
            bar = (top, top + 10)
            image[top:top + 10, 20:108] -= 0.35
        name = f"img{i:03d}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        found = [f for f, on in (("disk", disk), ("bar", bar)) if on is not None]
        rows.append({"path": name, "label": "|".join(found) or "No Finding", "patient_id": f"p{i}"})
        planted[name] = (disk, bar)
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return planted


def test_multilabel_maps_explain_each_finding_where_it_lies(tmp_path):
    planted = two_findings_set(tmp_path / "data")
    # one epoch: validation AUROC is already 1.0 there. Trained to epoch 4 (val loss 0.009, which the tie rule of
    # epoch selection now keeps), Grad-CAM at blocks.4 puts the disk's peak on the disk in only half the images.
    run = finetune("demo", data=tmp_path / "data", out=tmp_path / "run",
                   overrides=[*TRAIN, "data.task=multilabel", "data.classes=[disk, bar]", "train.optimizer=adamw",
                              "train.lr=0.002", "train.epochs=1"])
    report = json.loads((run / "report.json").read_text())
    assert all(report["splits"]["test"]["per_label"][f]["auroc"] > 0.9 for f in ("disk", "bar"))
    opened = open_run(run, device="cpu")
    test = opened.dataset(split="test")
    both = [tmp_path / "data" / test.store.records[i]["key"] for i in test.indices
            if None not in planted[test.store.records[i]["key"]]]  # held-out images with both findings
    assert len(both) >= 6
    for finding in ("disk", "bar"):  # one image, two maps: each finding's peak on that finding (half a cell: 8 px)
        result = explain(opened, both, layer="blocks.4", target_class=finding)
        assert result.class_names == [finding] * len(both)
        near = []
        for path, saliency in zip(result.paths, result.maps, strict=True):
            disk, bar = planted[path.rsplit("/", 1)[-1]]
            py, px = np.unravel_index(np.argmax(saliency), saliency.shape)
            near.append(np.hypot(py - disk[0], px - disk[1]) <= 14 + 8 if finding == "disk"
                        else bar[0] - 8 <= py < bar[1] + 8 and 20 - 8 <= px < 108 + 8)
        assert np.mean(near) >= 0.6, (finding, np.mean(near))
    only_disk = [tmp_path / "data" / k for k, (disk, bar) in planted.items() if disk and bar is None][:4]
    result = explain(opened, only_disk, method="occlusion")  # default: the most confident finding, by sigmoid
    thresholds = json.loads((run / "model.json").read_text())["thresholds"]
    for path, probs, name, saliency in zip(result.paths, result.probabilities, result.class_names, result.maps,
                                           strict=True):
        assert name == ["disk", "bar"][int(np.argmax(probs - [thresholds["disk"], thresholds["bar"]]))]
        if name == "disk":  # hiding the disk lowers its sigmoid most: the occlusion peak is on it (a mask: 16 px)
            disk, _ = planted[path.rsplit("/", 1)[-1]]
            py, px = np.unravel_index(np.argmax(saliency), saliency.shape)
            assert np.hypot(py - disk[0], px - disk[1]) <= 14 + 16
    assert result.class_names.count("disk") >= 3
    check = sanity_check(opened.model, torch.from_numpy(result.images), result.classes, multilabel=True)
    assert check["steps"][-1]["spearman"] < 0.5 and not check["flagged"]


class TwoRegions(MedModel):
    """Logits of two regions' mean brightness: class 0 = 8 x mean(left half), class 1 = 8 x mean(right half)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.arch, self.scale = "resnet18", nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * torch.stack([8 * x[..., :16].mean((1, 2, 3)), 8 * x[..., 16:].mean((1, 2, 3))], 1)


def test_multilabel_occlusion_reads_each_findings_own_sigmoid():
    x = torch.full((1, 1, 32, 32), 0.9)
    x[..., 16:] = 0.2  # occlusion fills with the image mean: hiding the bright left half lowers class 0's logit,
    # hiding the dark right half raises class 1's
    maps = {multilabel: Explainer(TwoRegions(), "occlusion", multilabel=multilabel)(x, [0])[0]
            for multilabel in (False, True)}
    # a finding's sigmoid depends on its own logit only: hiding the right half leaves finding 0 alone; a softmax
    # couples the classes, so there class 1's rise shows up in class 0's map
    assert maps[True][:, 24:].max() == 0 and maps[True][:, :8].max() > 0
    assert maps[False][:, 24:].max() > 0


def test_multilabel_maps_default_to_the_finding_furthest_above_its_threshold():
    logits = torch.logit(torch.tensor([[0.9, 0.6], [0.8, 0.1]]))  # margins (-0.05, 0.3) and (-0.15, -0.2)
    run = SimpleNamespace(model=lambda images: logits, device="cpu", multilabel=True, threshold=[0.95, 0.3])
    decided, probs = decided_classes(run, torch.zeros(2, 1, 8, 8))
    assert decided == [1, 0] and probs == pytest.approx(logits.sigmoid().numpy())  # not the largest sigmoid: 0


def _two_maps():
    from medtricks.explain import Explained

    rng = np.random.default_rng(0)
    return Explained(maps=rng.random((2, 8, 8)).astype(np.float32), images=rng.random((2, 1, 8, 8)),
                     classes=[0, 1], class_names=["normal", "opacity"], probabilities=np.full((2, 2), 0.5),
                     paths=["a.png", "b.png"], unreadable=[])


def test_an_interrupted_explain_leaves_no_half_folder_and_overwrite_writes_in_place(tmp_path, monkeypatch):
    from medtricks import plots
    from medtricks.explain import write_explanations

    real, calls = plots.plot_saliency, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_saliency", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        write_explanations(_two_maps(), tmp_path / "maps", "gradcam")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(plots, "plot_saliency", real)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    write_explanations(_two_maps(), tmp_path / "mine", "gradcam", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "mine" / "explain.json").is_file()
    # an --overwrite with fewer images: the earlier explain's maps go (they sat beside the new ones and looked
    # current), the user's file stays, and an interrupted one leaves the earlier explain as it was
    one = _two_maps()
    one = type(one)(maps=one.maps[1:], images=one.images[1:], classes=[1], class_names=["opacity"],
                    probabilities=one.probabilities[1:], paths=["b.png"], unreadable=[])
    before = sorted(p.name for p in (tmp_path / "mine").iterdir())
    monkeypatch.setattr(plots, "plot_saliency", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_explanations(one, tmp_path / "mine", "occlusion", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == before
    monkeypatch.setattr(plots, "plot_saliency", real)
    # an interrupt while the files are swapped in puts the earlier set back; a folder named like an output is refused
    import os

    from medtricks import files
    from medtricks.files import OutputError

    real_replace, calls = os.replace, []

    def stops_on_the_second_move_in(src, dst):
        if Path(src).parent.name.startswith(".new.") and Path(dst).parent == tmp_path / "mine":  # a move in
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", stops_on_the_second_move_in)
    with pytest.raises(KeyboardInterrupt):
        write_explanations(one, tmp_path / "mine", "occlusion", overwrite=True)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert len(calls) == 2 and sorted(p.name for p in (tmp_path / "mine").iterdir()) == before
    (tmp_path / "mine" / "0009-x-gradcam.png").mkdir()
    with pytest.raises(OutputError, match="0009-x-gradcam.png: a folder with the name of one of this command's"):
        write_explanations(one, tmp_path / "mine", "occlusion", overwrite=True)
    (tmp_path / "mine" / "0009-x-gradcam.png").rmdir()
    write_explanations(one, tmp_path / "mine", "occlusion", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [
        "0000-b-occlusion.npy", "0000-b-occlusion.png", "explain.json", "notes.txt"]
