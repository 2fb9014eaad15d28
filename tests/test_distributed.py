"""Distributed training under torchrun (2 CPU processes, gloo): the run it writes, its equivalence with one process,
exact sharded evaluation, errors that reach every rank, resume; and the sampler's sharding as unit tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtricks import distributed
from medtricks.data.sampling import SeededSampler
from medtricks.errors import MedtricksError
from medtricks.finetune import finetune
from medtricks.runs import RESUME_FILE, load_resume_state
from medtricks.train import TIMING_KEYS

TINY = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=2",
        "train.batch_size=8", "train.eval_batch_size=16"]
# Only the classifier trains and every BatchNorm stays in eval mode (frozen stages): a sample's forward does not
# depend on the other images of its batch, so 2 processes must give the 1-process numbers up to float reduction order.
FROZEN = [*TINY, "model.arch=resnet18", "model.weights=none", "model.freeze=[stem,layer1,layer2,layer3,layer4]",
          "tricks.amp=null"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores: one thread each


def _torchrun(*args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, **popen)


def _finetune_2(data, out, overrides, *extra: str) -> subprocess.CompletedProcess:
    sets = [arg for s in overrides for arg in ("--set", s)]
    return _torchrun("-m", "medtricks", "finetune", "--recipe", "demo", "--data", str(data), "--out", str(out),
                     "--quiet", *sets, *extra)


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc): torchrun starts its workers in sessions of their own."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [d for child in map(int, children) for d in (child, *_descendants(child))]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _report(run) -> dict:
    report = json.loads((run / "report.json").read_text())
    return {**report, "train": {k: v for k, v in report["train"].items() if k not in TIMING_KEYS}}


@pytest.fixture(scope="module")
def two_process_run(phantoms_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = _finetune_2(phantoms_train, out, TINY)
    assert done.returncode == 0, done.stderr
    return out, done


def test_two_processes_write_one_complete_run(two_process_run, phantoms_train, tmp_path):
    """The demo recipe (BN trained) on 2 processes vs 1 process with the same global batch (8) and seed.

    The global batches hold the same images and augmentations, and the LR schedule is the same. What differs is
    BatchNorm: each process normalizes over its 4 images instead of 8 (and the saved running statistics are rank
    0's), plus float reduction order. On this 32-px, 2-epoch run that moved the val loss (mean cross-entropy, about
    0.67) by 0.013 and 0.017 and the train loss by 0.02 and 0.17 (measured). Tolerance: 0.1 on the val loss per
    epoch. The 15-image val AUROC and accuracy move in coarse steps and are not compared; the exact equivalence of
    data, LR and gradients is checked with frozen BatchNorm (slow test below), exact evaluation by the next test.
    """
    run, done = two_process_run
    assert done.stdout.strip() == str(run)  # only rank 0 prints
    for name in ("recipe.yaml", "model.safetensors", "model.json", "metrics.jsonl", "report.json"):
        assert (run / name).is_file(), name
    assert not (run / RESUME_FILE).exists()
    assert {p.name for p in (run / "plots").iterdir()} >= {"training_curves.png", "roc_val.png"}
    assert not any(key.startswith("module.") for key in load_file(str(run / "model.safetensors")))  # not DDP's
    report = json.loads((run / "report.json").read_text())
    assert report["train"]["world_size"] == 2
    assert set(report["splits"]) == {"val", "test"}
    one = finetune("demo", data=phantoms_train, out=tmp_path / "one", overrides=TINY)
    assert json.loads((one / "report.json").read_text())["train"]["world_size"] == 1
    rows, rows_one = _rows(run), _rows(one)
    assert [r["epoch"] for r in rows] == [1, 2]
    # 54 train images, global batch 8, drop_last: 6 steps of 4 + 4 images = 48 per epoch, as with one process
    assert [r["images"] for r in rows] == [r["images"] for r in rows_one] == [48, 48]
    assert [r["lr"] for r in rows] == [r["lr"] for r in rows_one]
    for row, row_one in zip(rows, rows_one, strict=True):
        assert abs(row["val_loss"] - row_one["val_loss"]) < 0.1
    assert report["splits"]["val"]["n"] == 15 and report["splits"]["test"]["n"] == 11  # none dropped or repeated


@pytest.mark.slow
def test_frozen_batchnorm_two_processes_equal_one(phantoms_train, tmp_path):
    """With no batch-dependent layer training, 2 processes x 4 images must train exactly what 1 process x 8 does:
    same images, augmentation seeds, LR and averaged gradient. Tolerance 1e-6 relative: float reduction order
    (mean of two 4-image means vs one 8-image mean; 1 vs 2 threads) only; measured about 1e-8."""
    two = tmp_path / "two"
    done = _finetune_2(phantoms_train, two, FROZEN)
    assert done.returncode == 0, done.stderr
    one = finetune("demo", data=phantoms_train, out=tmp_path / "one", overrides=FROZEN)
    rows, rows_one = _rows(two), _rows(one)
    for row, row_one in zip(rows, rows_one, strict=True):
        for key in ("train_loss", "val_loss"):
            assert row[key] == pytest.approx(row_one[key], rel=1e-6), key
        assert row["images"] == row_one["images"] and row["lr"] == row_one["lr"]
    a, b = _report(two)["splits"], _report(one)["splits"]
    for split in ("val", "test"):
        for key in ("n", "auroc", "accuracy", "sensitivity", "specificity"):
            assert a[split][key] == pytest.approx(b[split][key], rel=1e-6), (split, key)


EVAL_SCRIPT = """
import json, sys
from torch.utils.data import DataLoader
from medtricks import distributed
from medtricks.data.pipeline import load_eval_data
from medtricks.finetune import evaluate
from medtricks.recipe import load_recipe_from_dict
from medtricks.runs import load_run_model, read_run
from medtricks.scoring import predict_loader

run, out = sys.argv[1], sys.argv[2]
with distributed.process_group():
    model, info = load_run_model(run)
    recipe = load_recipe_from_dict(read_run(run)[1])
    result = {"world_size": distributed.world_size()}
    for split in ("val", "test"):
        dataset, _ = load_eval_data(recipe.data, info["data"]["source"], split, recipe.seed, tuple(info["classes"]))
        loader = DataLoader(dataset, batch_size=16, sampler=distributed.shard(len(dataset)))
        output = predict_loader(model, loader, "cpu")
        result[split] = {"labels": output.labels.tolist(), "probs": output.probs.tolist(),
                         "patient_ids": output.patient_ids, "loss": output.loss,
                         "metrics": evaluate(run, split=split)}
    if distributed.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
"""


def test_sharded_evaluation_equals_one_process_exactly(two_process_run, tmp_path):
    """Each rank predicts every other image, no padding; the gathered predictions and metrics are exactly those
    of one process, for 15 (val) and 11 (test) images: padding or a dropped image would show."""
    run, _ = two_process_run
    script = tmp_path / "evaluate_shards.py"
    script.write_text(EVAL_SCRIPT)
    one = subprocess.run([sys.executable, str(script), str(run), str(tmp_path / "one.json")], capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert one.returncode == 0, one.stderr
    two = _torchrun(str(script), str(run), str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (a.pop("world_size"), b.pop("world_size")) == (1, 2)
    assert [len(a[s]["labels"]) for s in ("val", "test")] == [15, 11]
    assert a == b  # labels, probabilities, patient ids, mean loss and every metric, bit for bit
    report = json.loads((run / "report.json").read_text())  # what finetune computed over 2 ranks
    for split in ("val", "test"):
        assert {k: a[split]["metrics"][k] for k in report["splits"][split]} == report["splits"][split]


def test_evaluate_command_under_torchrun_shards_and_prints_once(two_process_run, tmp_path):
    """`torchrun ... -m medtricks evaluate RUN --json F` joins the group (each rank predicts a shard), writes F once
    and prints one JSON object: report.json's val metrics."""
    run, _ = two_process_run
    done = _torchrun("-m", "medtricks", "evaluate", str(run), "--split", "val", "--json", str(tmp_path / "val.json"))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)  # one object: a second rank printing would make this invalid JSON
    assert printed == json.loads((tmp_path / "val.json").read_text())
    val = json.loads((run / "report.json").read_text())["splits"]["val"]
    assert {k: printed[k] for k in val} == val and printed["split"] == "val"


def test_an_error_on_rank_0_ends_every_rank(two_process_run, phantoms_train):
    """An existing --out fails on rank 0 (which alone creates the run); the error reaches rank 1, both exit 2 and
    --nproc returns that code (no rank waits forever: the subprocess timeout would fail the test)."""
    run, _ = two_process_run
    sets = [arg for s in TINY for arg in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "medtricks", "finetune", "--nproc", "2", "--recipe", "demo",
                           "--data", str(phantoms_train), "--out", str(run), *sets], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("the run directory already exists") == 2  # printed by each rank


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_report(phantoms_train, tmp_path):
    """SIGKILL the whole torchrun job after epoch 1 of 3, resume it under torchrun: same report and rows as the
    uninterrupted 2-process run (EMA and mixup on: state across epochs and per-epoch randomness)."""
    overrides = [*TINY, "train.epochs=3", "tricks.ema={decay: 0.9}", "tricks.mixup={}"]
    reference = tmp_path / "reference"
    assert _finetune_2(phantoms_train, reference, overrides).returncode == 0
    out = tmp_path / "killed"
    sets = [arg for s in overrides for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "medtricks", "finetune", "--recipe", "demo", "--data", str(phantoms_train), "--out", str(out),
           "--quiet", *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 600
    while not (out / RESUME_FILE).exists() or load_resume_state(out)["epoch"] < 1:
        assert proc.poll() is None, "finished or failed before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for pid in [*_descendants(proc.pid), proc.pid]:  # both workers (own sessions) and the launcher, as a crash
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()
    done = _torchrun("-m", "medtricks", "finetune", "--out", str(out), "--resume", "--quiet")
    assert done.returncode == 0, done.stderr
    assert _report(out) == _report(reference)
    strip = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in _rows(out)]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in _rows(reference)]


# --- unit tests: one process --------------------------------------------------------------------------------


def _epoch(sampler: SeededSampler, epoch: int = 3) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n", [10, 11, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_sampler_shards_interleave_to_the_one_process_order(n, weighted):
    weights = torch.arange(1.0, n + 1) if weighted else None
    whole = _epoch(SeededSampler(n, seed=4, weights=weights))
    for world in (2, 3, 4):
        shards = [_epoch(SeededSampler(n, seed=4, weights=weights, num_replicas=world, rank=r)) for r in range(world)]
        assert {len(s) for s in shards} == {-(-n // world)}  # equal lengths: every rank takes as many steps
        interleaved = [pair for k in range(len(shards[0])) for pair in (s[k] for s in shards)]
        padding = len(interleaved) - n
        assert interleaved[:n] == whole and interleaved[n:] == (whole * world)[:padding]  # the first pairs again
        assert 0 <= padding < world


def test_sampler_global_batches_match_one_process_batches():
    """Global batch k (rank 0's k-th local batch + rank 1's) = batch k of one process, seeds included."""
    whole = _epoch(SeededSampler(54, seed=0))
    shards = [_epoch(SeededSampler(54, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    for k in range(54 // 8):
        global_batch = shards[0][4 * k:4 * k + 4] + shards[1][4 * k:4 * k + 4]
        assert sorted(global_batch) == sorted(whole[8 * k:8 * k + 8])


def test_sampler_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank 2"):
        SeededSampler(10, seed=0, num_replicas=2, rank=2)


def test_eval_shards_are_disjoint_complete_and_unpadded(monkeypatch):
    for n in (0, 1, 7, 15):
        for world in (1, 2, 3, 4):
            shards = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
                shards.append(distributed.shard(n))
            assert sorted(p for s in shards for p in s) == list(range(n))  # each position exactly once


def test_single_process_helpers_are_no_ops():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    assert distributed.gather_by_position(["c", "a", "b"], [2, 0, 1]) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="overlap"):
        distributed.gather_by_position(["a", "b"], [0, 0])
    assert distributed.on_main(lambda: 42) == 42
    t = torch.tensor(1.5)
    assert distributed.mean(t) is t
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    assert distributed.convert_sync_batchnorm(model, torch.device("cpu")) is model
    assert distributed.local_batch_size(7) == 7
    with distributed.process_group():  # no WORLD_SIZE: nothing to join
        assert distributed.world_size() == 1


def test_local_batch_size_names_the_fix(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.local_batch_size(32) == 8
    with pytest.raises(MedtricksError, match=r"'train.batch_size' = 30 .* \(4\); use 28 or 32"):
        distributed.local_batch_size(30)


def test_nproc_inside_torchrun_is_an_error(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(MedtricksError, match="leave --nproc out"):
        distributed.launch(2, ["finetune"])


def test_a_killed_worker_is_named_with_the_way_back(monkeypatch, caplog):
    """A worker killed by a signal (the kernel's OOM killer) printed nothing; the user saw exit 1 under a stack of
    torchrun logs. The launcher names the process and the signal, and says how to resume."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def killed(config):
        raise ChildFailedError("medtricks", {1: ProcessFailure(local_rank=1, pid=4242, exitcode=-9,
                                                               error_file="/nonexistent")})

    monkeypatch.setattr(torchrun, "run", killed)
    caplog.set_level("ERROR")
    assert distributed.launch(2, ["finetune", "--recipe", "demo"]) == 1
    assert "process 1 of 2 (medtricks finetune) was killed by SIGKILL" in caplog.text and "--resume" in caplog.text



def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    """torch 2.14's SyncBatchNorm raises for CPU inputs; train.sync_bn says so before training starts."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(MedtricksError, match="train.sync_bn' = true needs CUDA"):
            distributed.convert_sync_batchnorm(torch.nn.BatchNorm2d(3), torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()


def test_a_stop_signal_under_nproc_is_one_line_and_its_exit_code(monkeypatch, caplog):
    """torchrun's agent turns SIGTERM / Ctrl-C into its SignalException: it escaped as a 20-frame traceback, exit 1."""
    import signal

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def stopped(config):
        raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)

    monkeypatch.setattr(torchrun, "run", stopped)
    caplog.set_level("ERROR")
    assert distributed.launch(2, ["finetune"]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in caplog.text
