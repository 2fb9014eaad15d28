"""Smoke runs of the benchmark scripts: they run and print the JSON their README section quotes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_throughput_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--n", "6", "--size", "400",
                          "--workers", "1"], capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    for key in ("no_cache_epoch", "first_epoch", "cached_epoch"):
        assert report[key]["images_per_second"] > 0
    assert report["settings"]["n"] == 6 and report["peak_rss_mb"]["main"] > 0
