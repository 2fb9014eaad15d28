"""Resume after a kill (SIGKILL included) and determinism: the same recipe and seed give the same report.json."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medtricks.data.sampling import SeededSampler
from medtricks.errors import RecipeError
from medtricks.finetune import finetune
from medtricks.runs import RESUME_FILE, RunError, load_resume_state, save_resume_state
from medtricks.train import TIMING_KEYS

# Tricks that carry state across epochs (EMA, optimizer momentum, warmup/cosine step) or draw randomness (mixup):
# the resumed run must restore or replay all of them.
RESUME = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=4",
          "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1", "tricks.mixup={}", "tricks.ema={}"]


def _without_timing(report: dict) -> dict:
    return {**report, "train": {k: v for k, v in report["train"].items() if k not in TIMING_KEYS}}


def _rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture(scope="module")
def reference(phantoms_train, tmp_path_factory):
    return finetune("demo", data=phantoms_train, out=tmp_path_factory.mktemp("ref") / "run", overrides=RESUME)


def test_same_seed_gives_identical_report(reference, phantoms_train, tmp_path):
    again = finetune("demo", data=phantoms_train, out=tmp_path / "again", overrides=RESUME)
    a, b = (json.loads((run / "report.json").read_text()) for run in (reference, again))
    assert _without_timing(a) == _without_timing(b)
    assert _rows(reference) == _rows(again)
    assert (reference / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert not (reference / RESUME_FILE).exists()  # removed once the run is complete


def test_worker_count_does_not_change_the_run(reference, phantoms_train, tmp_path):
    """Order and augmentation come from (seed, epoch, position), not from the worker processes' RNG."""
    two = finetune("demo", data=phantoms_train, out=tmp_path / "workers",
                   overrides=[*RESUME, "data.workers=2", "train.epochs=2"])
    zero = finetune("demo", data=phantoms_train, out=tmp_path / "inline", overrides=[*RESUME, "train.epochs=2"])
    assert _rows(two) == _rows(zero)


def test_resume_in_process_after_a_crash_matches(reference, phantoms_train, tmp_path, monkeypatch):
    ft = importlib.import_module("medtricks.finetune")  # the package also exports the function finetune
    out = tmp_path / "crashed"
    real = ft.save_resume_state
    calls = []

    def crash_after_two_epochs(run, state):
        real(run, state)
        calls.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # as abrupt as it gets in-process: nothing after the state write runs

    monkeypatch.setattr(ft, "save_resume_state", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        finetune("demo", data=phantoms_train, out=out, overrides=RESUME)
    monkeypatch.setattr(ft, "save_resume_state", real)
    assert not (out / "report.json").exists() and load_resume_state(out)["epoch"] == 2
    with pytest.raises(RunError, match="already exists"):
        finetune("demo", data=phantoms_train, out=out, overrides=RESUME)  # never overwritten without --resume
    finetune(None, out=out, resume=True)
    a, b = (json.loads((run / "report.json").read_text()) for run in (reference, out))
    assert _without_timing(a) == _without_timing(b)
    assert _rows(reference) == _rows(out)


def test_resume_refuses_other_settings_and_finished_runs(reference, tmp_path, phantoms_train):
    with pytest.raises(RunError, match="finished"):
        finetune(None, out=reference, resume=True)
    with pytest.raises(RunError, match="existing run directory"):
        finetune(None, out=tmp_path / "nothing", resume=True)
    out = tmp_path / "partial"
    out.mkdir()
    (out / "recipe.yaml").write_text((reference / "recipe.yaml").read_text())
    with pytest.raises(RecipeError, match=r"differs from the run's recipe.yaml in train\.lr;"):
        finetune("demo", out=out, overrides=[*RESUME, "train.lr=0.5"], resume=True)


@pytest.mark.parametrize("edit, key", [("train.epochs=1", "train.epochs"), ("train.lr=0.5", "train.lr"),
                                       ("train.epochs=1 in an older state", "train.epochs")])
def test_resume_refuses_a_recipe_yaml_edited_after_training_began(phantoms_train, tmp_path, monkeypatch, edit, key):
    """Fewer epochs than were run would end the run with its trained epochs unaccounted for; any other edit would
    mix two experiments. States of older versions hold no recipe: their epoch count is still checked."""
    import yaml

    ft = importlib.import_module("medtricks.finetune")
    out, real = tmp_path / "edited", ft.save_resume_state

    def crash_after_two_epochs(run, state):
        if "older" in edit:
            state = {k: v for k, v in state.items() if k != "recipe"}
        real(run, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_resume_state", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        finetune("demo", data=phantoms_train, out=out, overrides=[*RESUME, "train.limit_train_batches=1"])
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    name, value = edit.split()[0].split("=")
    saved["train"][name.split(".")[1]] = yaml.safe_load(value)
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunError, match=rf"recipe.yaml was edited after training began \({key} differ.*2 completed"):
        finetune(None, out=out, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_before_the_first_epoch_starts_over(reference, phantoms_train, tmp_path):
    out = tmp_path / "early"
    out.mkdir()
    (out / "recipe.yaml").write_text((reference / "recipe.yaml").read_text())
    (out / "metrics.jsonl").write_text('{"epoch": 1, "half": true}\n')  # a row whose state never got saved
    finetune(None, data=phantoms_train, out=out, resume=True)
    assert _rows(out) == _rows(reference)


def test_killed_before_the_first_epoch_resumes_on_the_data_it_was_given(reference, phantoms_train, tmp_path,
                                                                          monkeypatch):
    # The demo recipe's own source is another folder (and RESUME turns off writing phantoms there): a resume that
    # fell back to it would fail or train on other images. model.json records the source when the run opens.
    ft = importlib.import_module("medtricks.finetune")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    runs = {name: tmp_path / name for name in ("early", "early_other_data")}
    monkeypatch.setattr(ft, "fit", killed)
    for out in runs.values():
        with pytest.raises(KeyboardInterrupt):
            finetune("demo", data=phantoms_train, out=out, overrides=RESUME)
    monkeypatch.undo()
    assert load_resume_state(runs["early"]) is None and not (runs["early"] / "report.json").exists()
    finetune(None, out=runs["early"], resume=True)
    assert _rows(runs["early"]) == _rows(reference)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RunError, match="it was trained on"):
        finetune(None, data=other, out=runs["early_other_data"], resume=True)


def test_resume_state_round_trip(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {"epoch": 3, "best_value": None, "optimizer": opt.state_dict(), "rows": [{"a": 1.5}],
             "ema": None, "nested": {"t": torch.arange(4.0), "xs": [torch.zeros(2, 2), "s"]}}
    save_resume_state(tmp_path, state)
    back = load_resume_state(tmp_path)
    assert back["epoch"] == 3 and back["best_value"] is None and back["rows"] == [{"a": 1.5}]
    assert list(back["optimizer"]["state"]) == [0]  # integer keys stay integers, as torch needs them
    torch.testing.assert_close(back["optimizer"]["state"][0]["momentum_buffer"],
                               opt.state_dict()["state"][0]["momentum_buffer"])
    torch.testing.assert_close(back["nested"]["xs"][0], torch.zeros(2, 2))
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    fresh.load_state_dict(back["optimizer"])
    (tmp_path / RESUME_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(RunError, match="unreadable resume state"):
        load_resume_state(tmp_path)


def test_seeded_sampler_is_a_function_of_seed_and_epoch():
    sampler = SeededSampler(10, seed=4)
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10))
    sampler.set_epoch(2)
    assert list(sampler) != first
    again = SeededSampler(10, seed=4)
    again.set_epoch(1)
    assert list(again) == first
    weighted = SeededSampler(10, seed=4, weights=torch.tensor([1.0] + [0.0] * 9))
    assert {i for i, _ in weighted} == {0}


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_the_same_report(reference, phantoms_train, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medtricks", "finetune", "--recipe", "demo", "--data", str(phantoms_train),
           "--out", str(out), "--quiet", *[arg for s in RESUME for arg in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 600
    while not (out / RESUME_FILE).exists() or load_resume_state(out)["epoch"] < 2:
        assert proc.poll() is None, f"finished or failed before it could be killed: {proc.stderr.read()!r}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "report.json").exists()
    done = subprocess.run([sys.executable, "-m", "medtricks", "finetune", "--out", str(out), "--resume", "--quiet"],
                          capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    a, b = (json.loads((run / "report.json").read_text()) for run in (reference, out))
    assert _without_timing(a) == _without_timing(b)
    assert _rows(reference) == _rows(out)


@pytest.mark.parametrize("link", ["metrics.jsonl", "plots", "plots/roc_test.png"])
def test_resume_refuses_a_run_with_a_link_among_its_own_files(tmp_path, link):
    """A run unpacked from elsewhere could link metrics.jsonl to ~/.bashrc: resuming must not write through it."""
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    (run / "plots").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: demo\n")
    victim.write_text("the user's own file")
    if link == "plots":
        (run / "plots").rmdir()
    (run / link).symlink_to(victim)
    with pytest.raises(RunError, match=f"{link} is a symbolic link"):
        finetune(None, out=run, resume=True)
    assert victim.read_text() == "the user's own file"


def test_a_run_being_trained_cannot_be_resumed_by_a_second_process(reference, phantoms_train, tmp_path, monkeypatch):
    """Two `finetune --resume` of one run both exited 0, each writing the run's files in turn (metrics.jsonl epochs
    1, 2, 3, 4, 3, 5, 4, 5). The lock is on the run folder (flock: released even on SIGKILL)."""
    from medtricks.runs import lock_run

    ft = importlib.import_module("medtricks.finetune")
    out = tmp_path / "early"
    out.mkdir()
    (out / "recipe.yaml").write_text((reference / "recipe.yaml").read_text())
    held = lock_run(out)  # another process training it (flock also excludes a second open in this process)
    try:
        with pytest.raises(RunError, match="another process is training this run now"):
            finetune(None, data=phantoms_train, out=out, resume=True)
    finally:
        os.close(held)
    real, seen = ft.save_resume_state, []

    def try_to_lock(run, state):  # while this call trains, the run is locked against others
        real(run, state)
        with pytest.raises(RunError, match="another process is training"):
            lock_run(run)
        seen.append(state["epoch"])

    monkeypatch.setattr(ft, "save_resume_state", try_to_lock)
    finetune(None, data=phantoms_train, out=out, resume=True)
    assert seen == [1, 2, 3, 4] and _rows(out) == _rows(reference)
    os.close(lock_run(out))  # released when training ended
    seen.clear()
    finetune("demo", data=phantoms_train, out=tmp_path / "fresh", overrides=RESUME)  # a new run is locked too
    assert seen == [1, 2, 3, 4]


def test_sigterm_to_the_process_group_stops_training_without_a_traceback(phantoms_train, tmp_path):
    """timeout, Slurm and systemd send SIGTERM to the whole process group: the DataLoader workers died of it under
    the main process, whose orderly exit then failed with "DataLoader worker is killed by signal" tracebacks and,
    at times, exit 1. An error while the stop unwinds is a consequence of the stop: the exit is 143 and one line.
    (The workers must not ignore SIGTERM: multiprocessing ends them with it when the process exits.)"""
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "medtricks", "finetune", "--recipe", "demo", "--data", str(phantoms_train),
           "--out", str(out), "--quiet", *[arg for s in [*RESUME, "data.workers=2", "train.epochs=30"]
                                           for arg in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy(),
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / RESUME_FILE).exists():
        assert proc.poll() is None, f"finished or failed before it could be stopped: {proc.stderr.read()!r}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch, workers busy
    os.killpg(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    assert not (out / "report.json").exists() and load_resume_state(out)["epoch"] >= 1


def test_a_killed_data_worker_ends_the_command_instead_of_hanging(phantoms_train, tmp_path):
    """The kernel's OOM killer ends a DataLoader worker: the command must exit (non-zero), not wait forever. Workers
    that ignored SIGTERM (an earlier fix for stops sent to the process group) outlived the failed main process,
    whose exit waits for them after sending SIGTERM."""
    out = tmp_path / "oom"
    cmd = [sys.executable, "-m", "medtricks", "finetune", "--recipe", "demo", "--data", str(phantoms_train),
           "--out", str(out), "--quiet", *[arg for s in [*RESUME, "data.workers=2", "train.epochs=30"]
                                           for arg in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 600
    while not (out / RESUME_FILE).exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert children, "no DataLoader worker to kill"
    os.kill(int(children[0]), signal.SIGKILL)
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
