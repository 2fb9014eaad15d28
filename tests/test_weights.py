"""Pretrained weights: the offline EfficientNet-Lite0 file on real photos, sha256 checks, the on-disk layouts
(torchvision, SIN, old DenseNet names, lukemelas), safe loading, the offline message and the `weights` commands.

Every test points MEDTRICKS_CACHE at tmp_path and sets MEDTRICKS_OFFLINE=1: nothing touches ~/.cache or the network.
Checkpoints other than the packaged EfficientNet file are random models saved in the real files' formats.
"""

import dataclasses
import pathlib
import pickle
import re

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.errors import MedtricksError
from medtricks.models import REGISTRY, WeightsError, create_model, load_checkpoint
from medtricks.models.weights import _lukemelas_to_timm, sha256_of, weights_path

runner = CliRunner()
EFFNET = ("efficientnet_lite0", "imagenet")
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty weights cache in tmp_path, offline."""
    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "medtricks"))
    folder = tmp_path / "medtricks" / "weights"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def photos():
    """skimage's chelsea (a tabby cat) and coffee (a cup of espresso), float [0, 1], 2x3x224x224."""
    skdata = pytest.importorskip("skimage.data")

    def load(image):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)

    return torch.cat([load(skdata.chelsea()), load(skdata.coffee())])


def _top5(model, x):
    with torch.no_grad():
        return [set(row.tolist()) for row in model(x).topk(5, dim=1).indices]


def _equal_states(loaded: dict, saved: dict) -> None:
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


# ---- the offline EfficientNet-Lite0 ImageNet file -------------------------------------------------------------------

def test_efficientnet_lite0_imagenet_recognizes_cat_and_coffee(cache, photos):
    model = create_model("efficientnet_lite0", num_classes=1000, in_chans=3, weights="imagenet").eval()
    cat, coffee = _top5(model, photos)
    assert cat & CATS, f"no cat class in top-5 {cat}"
    assert coffee & COFFEE, f"no coffee/cup class in top-5 {coffee}"


def test_random_efficientnet_lite0_does_not_recognize_them(cache, photos):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=1000, in_chans=3, weights="none").eval()
    cat, coffee = _top5(model, photos)
    assert not (cat & CATS) or not (coffee & COFFEE), (cat, coffee)


def test_packaged_file_sha256_is_checked(cache, monkeypatch):
    monkeypatch.setitem(REGISTRY, EFFNET, dataclasses.replace(REGISTRY[EFFNET], sha256="0" * 64))
    with pytest.raises(WeightsError, match="does not match"):
        create_model("efficientnet_lite0", num_classes=2, weights="imagenet")


def test_lukemelas_names_map_onto_timm_tf_efficientnet_lite0(cache):
    state = load_checkpoint(weights_path(REGISTRY[EFFNET]))
    assert any(k.startswith("_blocks.") for k in state)  # really the lukemelas layout
    remapped = _lukemelas_to_timm(state)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(remapped) == set(target)
    assert len(remapped) == len(state)  # one-to-one
    for key, value in target.items():
        assert remapped[key].shape == value.shape, key


# ---- torchvision, SIN and old DenseNet layouts --------------------------------------------------------------------

def test_torchvision_resnet50_file_loads_after_its_sha256_check(cache, monkeypatch):
    key = ("resnet50", "imagenet")
    original = REGISTRY[key]
    saved = torchvision.models.resnet50().state_dict()
    path = cache / original.filename
    torch.save(saved, path)
    monkeypatch.setitem(REGISTRY, key, dataclasses.replace(original, sha256=sha256_of(path)))

    model = create_model("resnet50", 3, weights="imagenet")
    assert torch.equal(model.backbone.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, saved["layer4.2.bn3.running_var"])
    assert model.backbone.fc.out_features == 3 and model.backbone.fc.in_features == 2048

    monkeypatch.setitem(REGISTRY, key, original)  # the published full hash: this random file is refused
    with pytest.raises(WeightsError, match="does not match"):
        create_model("resnet50", 3, weights="imagenet")


def test_sin_checkpoint_loads_with_a_warning_on_its_prefix(cache):
    spec = REGISTRY[("resnet50", "sin_in")]
    saved = torchvision.models.resnet50().state_dict()
    torch.save({"epoch": 60, "arch": "resnet50", "state_dict": {"module." + k: v for k, v in saved.items()}},
               cache / spec.filename)
    with pytest.warns(UserWarning, match="prefix"):
        model = create_model("resnet50", 1000, weights="sin_in")
    _equal_states(model.backbone.state_dict(), saved)


def _legacy_densenet_names(state: dict) -> dict:
    """torchvision's pre-0.3 DenseNet key names: denselayerN.norm1.weight -> denselayerN.norm.1.weight, etc."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
    return {pattern.sub(r"\1.\2.\3", k): v for k, v in state.items()}


def test_old_densenet_key_names_are_renamed(cache, tmp_path):
    saved = torchvision.models.densenet121().state_dict()
    legacy = _legacy_densenet_names(saved)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock4.denselayer16.conv.2.weight" in legacy
    assert "features.denseblock1.denselayer1.norm1.weight" not in legacy
    path = tmp_path / "densenet121-old-names.pth"  # not a registry file name: the layout is detected
    torch.save(legacy, path)
    model = create_model("densenet121", 1000, weights=str(path))
    _equal_states(model.backbone.state_dict(), saved)


def test_old_densenet_file_without_num_batches_tracked_loads(cache, tmp_path):
    saved = torchvision.models.densenet121().state_dict()
    legacy = {k: v for k, v in _legacy_densenet_names(saved).items() if not k.endswith("num_batches_tracked")}
    reference = torchvision.models.densenet121()
    reference.load_state_dict({k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")})  # torch: ok
    path = tmp_path / "densenet121-2017.pth"
    torch.save(legacy, path)
    model = create_model("densenet121", 1000, weights=str(path))
    assert torch.equal(model.backbone.features.denseblock2.denselayer3.conv1.weight,
                       saved["features.denseblock2.denselayer3.conv1.weight"])


# ---- local files ------------------------------------------------------------------------------------------------

def test_local_file_with_its_own_head(cache, tmp_path):
    saved = torchvision.models.resnet18(num_classes=2).state_dict()
    path = tmp_path / "finetuned-resnet18.pth"
    torch.save(saved, path)
    model = create_model("resnet18", num_classes=2, weights=str(path))
    _equal_states(model.backbone.state_dict(), saved)  # the file's 2-class head is kept

    model5 = create_model("resnet18", num_classes=5, weights=str(path))
    assert model5.backbone.fc.out_features == 5
    assert torch.equal(model5.backbone.layer2[1].conv2.weight, saved["layer2.1.conv2.weight"])


def test_wrong_architecture_file_names_missing_and_unexpected_keys(cache, tmp_path):
    path = tmp_path / "resnet18-weights.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match="keys do not match resnet50") as info:
        create_model("resnet50", 2, weights=str(path))
    message = str(info.value)
    assert "missing" in message and "unexpected" in message
    assert "bn3" in message  # a resnet50 key that the resnet18 file lacks is named


def test_safetensors_file_loads(cache, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    saved = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.safetensors"
    safetensors_torch.save_file(saved, str(path))
    model = create_model("resnet18", 1000, weights=str(path))
    _equal_states(model.backbone.state_dict(), saved)


class _Touch:
    """Unpickling this creates `marker`: stands in for a checkpoint that runs code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused(cache, tmp_path, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": _Touch(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)

    with pytest.raises(WeightsError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(WeightsError, match="refused"):
        create_model("resnet18", 2, weights=str(path))
    assert not marker.exists()

    if writer == "pickle.dump":  # the payload is live: an unrestricted unpickle does run it
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


@pytest.mark.parametrize("text", ["hello world\n", "a: 1\n"])
def test_text_file_is_a_weights_error(cache, tmp_path, text):
    path = tmp_path / "notes.pth"
    path.write_text(text)
    with pytest.raises(WeightsError):
        load_checkpoint(path)


def test_missing_local_file_with_a_registry_name_is_a_weights_error(cache, tmp_path):
    missing = tmp_path / "nowhere" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError, match="not found"):
        create_model("resnet18", 2, weights=str(missing))


def test_missing_local_file_is_a_weights_error(cache, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_model("resnet18", 2, weights=str(tmp_path / "nowhere" / "mine.pth"))


# ---- offline and not cached --------------------------------------------------------------------------------------

def _offline_message_parts(cache: pathlib.Path) -> list[str]:
    spec = REGISTRY[("resnet50", "imagenet")]
    return ["https://download.pytorch.org/models/resnet50-0676ba61.pth", spec.sha256, str(cache / spec.filename),
            "model.weights"]


def test_offline_missing_weights_say_what_to_do(cache):
    assert len(REGISTRY[("resnet50", "imagenet")].sha256) == 64
    with pytest.raises(WeightsError) as info:
        create_model("resnet50", 2, weights="imagenet")
    assert isinstance(info.value, MedtricksError)
    for part in _offline_message_parts(cache):
        assert part in str(info.value)
    assert not any(cache.iterdir())  # no partial download left behind


def test_cli_fetch_offline_exits_2_with_the_message(cache):
    result = runner.invoke(app, ["weights", "fetch", "resnet50:imagenet"])
    assert result.exit_code == 2, result.output
    for part in _offline_message_parts(cache):
        assert part in result.output
    assert "Traceback" not in result.output


# ---- the weights commands ----------------------------------------------------------------------------------------

def test_cli_list(cache):
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    status = {line.split()[0]: line.split(None, 1)[1] for line in lines if re.match(r"^\w+:\w+\s", line)}
    assert set(status) == {f"{a}:{n}" for a, n in REGISTRY}
    assert status["efficientnet_lite0:imagenet"].strip() == "available"
    assert status["resnet50:sin_in"].startswith("not cached")
    assert str(cache) in result.output


def test_cli_list_sees_a_cached_file(cache):
    spec = REGISTRY[("resnet50", "sin_in")]
    (cache / spec.filename).write_bytes(b"placeholder")
    result = runner.invoke(app, ["weights", "list"])
    line = next(line for line in result.output.splitlines() if line.startswith("resnet50:sin_in "))
    assert line.split(None, 1)[1].strip() == "available"


def test_cli_path_is_in_the_cache_folder(cache):
    result = runner.invoke(app, ["weights", "path", "resnet50:sin_in"])
    assert result.exit_code == 0, result.output
    spec = REGISTRY[("resnet50", "sin_in")]
    assert result.output.splitlines()[0] == str(cache / spec.filename)
    assert spec.url in result.output


def test_cli_path_bare_name_only_when_unambiguous(cache):
    result = runner.invoke(app, ["weights", "path", "sin_in"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith(REGISTRY[("resnet50", "sin_in")].filename)

    result = runner.invoke(app, ["weights", "path", "imagenet"])
    assert result.exit_code == 2
    assert "several" in result.output and "resnet50:imagenet" in result.output
    assert "Traceback" not in result.output


def test_cli_path_with_brackets_is_printed_verbatim(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache[v2]"))
    result = runner.invoke(app, ["weights", "path", "resnet50:sin_in"])
    assert result.exit_code == 0, result.output
    expected = tmp_path / "cache[v2]" / "weights" / REGISTRY[("resnet50", "sin_in")].filename
    assert result.output.splitlines()[0] == str(expected)


def test_cli_verify_packaged_efficientnet_file(cache):
    path = weights_path(REGISTRY[EFFNET])
    result = runner.invoke(app, ["weights", "verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "keys fit: efficientnet_lite0" in result.output
    assert REGISTRY[EFFNET].sha256 in result.output


def test_cli_verify_refuses_unsafe_file(cache, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Touch(marker)}, path)
    result = runner.invoke(app, ["weights", "verify", str(path)])
    assert result.exit_code == 2 and "refused" in result.output
    assert not marker.exists()


def test_cli_verify_a_folder_or_missing_file_exits_2(tmp_path):
    for path, words in ((tmp_path, "a folder"), (tmp_path / "gone.pth", "no such file")):
        result = runner.invoke(app, ["weights", "verify", str(path)])
        assert result.exit_code == 2 and words in result.output and "resnet" not in result.output, result.output


@pytest.mark.parametrize("text, name", [("hello world\n", "notes.txt"), ("a: 1\n", "notes.txt"),
                                        ("hello world\n", "damaged.safetensors")])
def test_cli_verify_text_file_exits_2(cache, tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    result = runner.invoke(app, ["weights", "verify", str(path)])
    assert result.exit_code == 2, result.output
