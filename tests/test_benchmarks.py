"""Smoke runs of the benchmark scripts: they run and print the JSON their README section quotes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_throughput_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--n", "24", "--size", "400",
                          "--workers", "1", "--image-size", "32", "--train-epochs", "2", "--batch-size", "4"],
                         capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    for key in ("no_cache_epoch", "first_epoch", "cached_epoch"):
        assert report[key]["images_per_second"] > 0
    assert report["settings"]["n"] == 24 and report["peak_rss_mb"]["main"] > 0
    epochs = report["training"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["data_wait_share"] < 1 for e in epochs)
    assert report["training"]["cached_epochs_max_data_wait_share"] == epochs[1]["data_wait_share"]


@pytest.mark.slow
def test_data_throughput_scaling_reports_memory_per_size():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--scaling", "6,12",
                          "--size", "200", "--image-size", "32", "--workers", "1", "--cache", "disk"],
                         capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    assert set(report["runs"]) == {"6", "12"} and report["settings"]["cache"] == "disk"
    assert all(run["peak_rss_mb"]["main"] > 0 for run in report["runs"].values())
    ratio = report["peak_rss_largest_vs_smallest"]["main"]
    assert ratio == round(report["runs"]["12"]["peak_rss_mb"]["main"] / report["runs"]["6"]["peak_rss_mb"]["main"], 3)


DERM = ROOT.parent / "shared" / "data" / "derm-isic"


@pytest.mark.slow
@pytest.mark.skipif(not (DERM / "labels.csv").is_file(), reason=f"real data set {DERM} is absent (../shared/data)")
def test_train_speed_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--models", "efficientnet_lite0",
                          "--n", "16", "--size", "64", "--epochs", "1", "--step-repeats", "1", "--data", str(DERM)],
                         capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    result = report["models"]["efficientnet_lite0"]
    assert result["weights"] == "imagenet" and report["settings"]["epochs"] == 1
    assert result["medtricks"]["images_per_second"]["first_epoch"] > 0 and result["speed_ratio"]["first_epoch"] > 0
    assert len(result["plain_fp32"]["runs"]) == 2  # two seeds: the run-to-run noise of val AUROC
    assert all(0 <= auroc <= 1 for auroc in [result["val_auroc"]["medtricks"], *result["val_auroc"]["plain"]])
    assert set(result["train_step_synthetic"]["speedup_vs_fp32"]) == {"fp32", "fp32_channels_last", "bf16",
                                                                        "bf16_channels_last"}
    assert result["train_gflop_per_image"] > 0 and report["machine"]["gemm_gflops"]["bfloat16"] > 0
