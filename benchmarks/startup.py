"""CLI startup time: `medtricks --help` and `medtricks recipes list` vs a bare `python -c "import torch"`.

Runs the three commands as fresh subprocesses (`sys.executable -m medtricks ...`, so no console script is needed),
interleaved round-robin (torch, help, list, torch, help, list, ...) so all three see the same load from other
processes, after one warm-up round that is not counted (the OS file cache is then warm for all three). Prints one
JSON object with each command's median, min and every time in seconds, the ratios of the medtricks medians to the
torch median (1.0: the CLI costs what importing torch costs; well below 1: the CLI no longer imports torch), the
load average before and after, and which heavy modules `import medtricks.cli` and each command import (from
`python -X importtime`). A command that exits non-zero stops the benchmark with its stderr.

Usage: python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import_torch": ["-c", "import torch"],
    "help": ["-m", "medtricks", "--help"],
    "recipes_list": ["-m", "medtricks", "recipes", "list"],
}
HEAVY = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "monai", "scipy", "medtricks.attacks",
         "medtricks.robustness", "medtricks.ablate", "medtricks.compare")
IMPORT_TIME = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (.+)$")  # self [us] | cumulative [us] | module


def run(args: list[str], importtime: bool = False) -> subprocess.CompletedProcess[str]:
    """`python [-X importtime] args` from the repo root (this checkout's medtricks); exits on a failure."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), *args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.exit(f"{' '.join(command)} exited with {out.returncode}:\n{out.stderr}")
    return out


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    run(args)
    return time.perf_counter() - started


def heavy_imports(args: list[str]) -> dict[str, object]:
    """The HEAVY modules (or their submodules) a fresh `python args` imports, and the import time in total."""
    found = [m.groups() for m in map(IMPORT_TIME.match, run(args, importtime=True).stderr.splitlines()) if m]
    modules = [name.strip() for _, name in found]
    top_level = sum(int(us) for us, name in found if not name.startswith(" "))  # unindented: imported directly
    return {"heavy": [h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)],
            "modules_imported": len(modules), "import_seconds": round(top_level / 1e6, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the three commands (after a warm-up)")
    args = parser.parse_args()
    loadavg_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for round_ in range(args.repeats + 1):
        for name, command in COMMANDS.items():
            took = timed(command)
            if round_ > 0:  # round 0 warms the file cache for all three
                seconds[name].append(took)
    loadavg_after = os.getloadavg()
    heavy = {"import medtricks.cli": heavy_imports(["-c", "import medtricks.cli"]),
             **{name: heavy_imports(COMMANDS[name]) for name in ("help", "recipes_list")}}
    median = {name: statistics.median(times) for name, times in seconds.items()}
    print(json.dumps({
        "benchmark": "startup",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "torch": importlib.metadata.version("torch"), "medtricks": importlib.metadata.version("medtricks"),
                    "loadavg_before": [round(x, 2) for x in loadavg_before],
                    "loadavg_after": [round(x, 2) for x in loadavg_after]},
        "settings": {"repeats": args.repeats, "warmup_rounds": 1, "order": "round-robin", "python": sys.executable,
                     "commands": {name: shlex.join(["python", *command]) for name, command in COMMANDS.items()}},
        "commands": {name: {"median": round(median[name], 4), "min": round(min(times), 4),
                            "seconds": [round(t, 4) for t in times]} for name, times in seconds.items()},
        "ratios": {"help_vs_import_torch": round(median["help"] / median["import_torch"], 3),
                   "recipes_list_vs_import_torch": round(median["recipes_list"] / median["import_torch"], 3)},
        "heavy_imports": heavy,
    }, indent=2))


if __name__ == "__main__":
    main()
