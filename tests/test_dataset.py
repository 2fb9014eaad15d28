import numpy as np
import pytest
import torch
from PIL import Image

from medtricks.data.dataset import ImageDataset, ImageStore, decode, dequantize, prepare_images, resolve_cache_mode
from medtricks.data.pipeline import load_data
from medtricks.data.sources import load_source
from medtricks.data.transforms import create_eval_transform
from medtricks.errors import DataError
from medtricks.recipe import DataConfig, SplitConfig


def _folder(tmp_path, n=6, bad=()):
    rng = np.random.default_rng(0)
    for i in range(n):
        path = tmp_path / ("normal" if i % 2 else "opacity") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in bad:
            path.write_text("not a png")
        else:
            Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)).save(path)
    return tmp_path


def test_decode_downsizes_short_side_and_keeps_16_bits(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.full((300, 200), 1000, np.uint16)).save(path)
    image, meta = decode({"image": path}, channels=1, max_side=100)
    assert image.dtype == torch.uint16 and tuple(image.shape) == (1, 150, 100) and meta["bit_depth"] == 16
    assert int(image.int().min()) == int(image.int().max()) == 1000  # torch has no min/max on uint16
    small, _ = decode({"image": path}, channels=3, max_side=1000)  # never upsampled
    assert tuple(small.shape) == (3, 300, 200)


@pytest.mark.parametrize("mode", ["memory", "disk", "none"])
def test_cache_modes_give_identical_samples(tmp_path, mode):
    source = load_source(_folder(tmp_path / "data"))
    reference = ImageStore(source.records, 1, 32, "none")
    store = ImageStore(source.records, 1, 32, mode, cache_dir=tmp_path / "cache")
    ok, problems, _ = prepare_images(store, workers=2)
    assert ok == list(range(6)) and problems == []
    if mode == "disk":
        assert len(list((tmp_path / "cache").rglob("*.npy"))) == 6
        assert all(m is None for m in store.memory)
    assert all((m is not None) == (mode == "memory") for m in store.memory)
    transform = create_eval_transform(24)
    for k in range(6):
        torch.testing.assert_close(store.load(k), reference.load(k), rtol=0, atol=0)
    dataset = ImageDataset(store, range(6), transform)
    sample = dataset[1]
    assert set(sample) == {"image", "label", "patient_id"}
    assert sample["image"].shape == (1, 24, 24) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) <= float(sample["image"].max()) <= 1.0


def test_disk_cache_is_reused_and_invalidated_by_change(tmp_path):
    source = load_source(_folder(tmp_path / "data"))
    store = ImageStore(source.records, 1, 32, "disk", cache_dir=tmp_path / "cache")
    prepare_images(store, workers=0)
    first = store.load(0)
    path = source.records[0]["image"]
    Image.fromarray(np.zeros((40, 30), np.uint16)).save(path)  # the file changes: its cache entry must not be used
    assert int(store.load(0).int().max()) == 0 and int(first.int().max()) > 0
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 7


def test_unreadable_images_are_listed_or_raised(tmp_path, caplog):
    data = _folder(tmp_path / "data", bad=(2, 5))
    config = DataConfig(classes=("normal", "opacity"), cache="memory", image_size=16, workers=0,
                        split=SplitConfig(0.5, 0.5, 0.0))
    with pytest.raises(DataError) as info:
        load_data(config, data)
    assert "2 unreadable images" in str(info.value) and "2.png" in str(info.value) and "5.png" in str(info.value)
    skipping = DataConfig(**{**config.__dict__, "on_error": "skip"})
    bundle = load_data(skipping, data)
    assert sorted(k for k, _ in bundle.skipped) == ["normal/5.png", "opacity/2.png"]
    assert sum(len(d) for d in bundle.splits.values()) == 4
    assert "skipping 2 unreadable images" in caplog.text and "5.png" in caplog.text


def test_load_data_on_phantoms(phantoms):
    config = DataConfig(classes=("normal", "opacity"), image_size=48, cache="auto", workers=0)
    bundle = load_data(config, phantoms, seed=0)
    assert set(bundle.splits) <= {"train", "val", "test"} and "train" in bundle.splits
    assert sum(len(d) for d in bundle.splits.values()) == 24
    batch = next(iter(torch.utils.data.DataLoader(bundle.splits["train"], batch_size=4)))
    assert batch["image"].shape == (4, 1, 48, 48) and batch["label"].dtype == torch.int64
    assert all(p.startswith("synth-") for p in batch["patient_id"])


def test_auto_cache_picks_disk_for_large_sets():
    records = [{"image": f"/x/{i}.dcm"} for i in range(100_000)]
    assert resolve_cache_mode("auto", records, 1, 256, memory_gb=2.0) == "disk"
    assert resolve_cache_mode("auto", records[:1000], 1, 256, memory_gb=2.0) == "memory"
    assert resolve_cache_mode("none", records, 1, 256, memory_gb=2.0) == "none"


def test_dequantize_scales_by_dtype():
    assert float(dequantize(torch.tensor([65535], dtype=torch.uint16))) == 1.0
    assert float(dequantize(torch.tensor([255], dtype=torch.uint8))) == 1.0
