"""Nothing lost: options that write a file never replace one the user did not ask to replace, never a run's own
files, and say so before any work; readers refuse unfinished or damaged runs. Every case runs through the CLI and
checks exit 2, a message naming the path, no traceback, and (nothing_lost) that no file of the data set or of an
existing run changed."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import nothing_lost
from medtricks.cli import app
from medtricks.finetune import finetune

TINY = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.batch_size=8", "train.eval_batch_size=16"]


@pytest.fixture(scope="module")
def run(phantoms_train, tmp_path_factory) -> Path:
    return finetune("demo", data=phantoms_train, out=tmp_path_factory.mktemp("runs") / "run", overrides=TINY)


def refused(args: list, *words: str, folders=()) -> str:
    """Run the CLI, expect exit 2 with `words` in the message and no traceback, and nothing changed in `folders`."""
    with nothing_lost(*folders):
        result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for word in words:
        assert str(word) in result.output, (word, result.output)
    return result.output


@pytest.mark.parametrize("name", ["model.json", "report.json", "recipe.yaml", "metrics.jsonl", "model.safetensors",
                                  "plots/roc_val.png", "attacks/new.json"])
@pytest.mark.parametrize("command", ["evaluate", "predict", "attack", "compare", "data-check"])
def test_a_runs_own_files_are_never_an_output_even_with_overwrite(run, phantoms_train, command, name):
    target = run / name
    args = {"evaluate": ["evaluate", run, "--json", target],
            "predict": ["predict", run, phantoms_train / "images", "--out", target],
            "attack": ["attack", run, "--pgd", "--eps", "2/255", "--limit", "2", "--json", target],
            "compare": ["compare", run, run, "--json", target],
            "data-check": ["data", "check", phantoms_train, "--json", target]}[command]
    refused([*args, "--overwrite"], "part of the run", name.split("/")[0], "finetune",
            folders=[run, phantoms_train])


@pytest.mark.parametrize("command", ["evaluate", "predict", "attack", "compare", "data-check"])
def test_an_existing_file_is_replaced_only_with_overwrite(run, phantoms_train, tmp_path, command):
    data = tmp_path / "data"
    shutil.copytree(phantoms_train, data)
    victim = data / "labels.csv"  # the data set's own manifest: the worst file to lose
    args = {"evaluate": ["evaluate", run, "--json", victim],
            "predict": ["predict", run, data / "images" / "normal", "--out", victim],
            "attack": ["attack", run, "--pgd", "--eps", "2/255", "--limit", "2", "--json", victim],
            "compare": ["compare", run, run, "--json", victim],
            "data-check": ["data", "check", data, "--json", victim]}[command]
    refused(args, victim, "exists", "--overwrite", folders=[run, data])
    other = tmp_path / "other.out"
    other.write_text("old")
    result = CliRunner().invoke(app, [str(a) for a in args[:-1]] + [str(other), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert other.read_text() != "old" and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("command", ["evaluate", "predict", "attack", "compare", "data-check"])
def test_a_file_written_by_someone_else_meanwhile_is_kept(run, phantoms_train, tmp_path, monkeypatch, command):
    """Two commands given the same new --json at once: the file that lands first is kept, the other one is refused
    (check_output saw no file before either did its work)."""
    import medtricks.files as files

    target = tmp_path / "same.out"
    write = files.atomic_write

    def theirs_first(path, fill, replace=True):
        if not replace and Path(path) == target:
            target.write_text("theirs")
        write(path, fill, replace)

    monkeypatch.setattr(files, "atomic_write", theirs_first)
    args = {"evaluate": ["evaluate", run, "--json", target],
            "predict": ["predict", run, phantoms_train / "images" / "normal", "--out", target],
            "attack": ["attack", run, "--pgd", "--eps", "2/255", "--limit", "2", "--json", target],
            "compare": ["compare", run, run, "--json", target],
            "data-check": ["data", "check", phantoms_train, "--json", target]}[command]
    refused(args, target, "appeared while the command ran", "--overwrite")
    assert target.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["same.out"]


@pytest.mark.parametrize("where, words", [
    ("missing/out.json", ["does not exist"]),
    ("a_file/out.json", ["does not exist (or is not a folder)"]),
    ("folder", ["is a folder"]),
])
def test_a_missing_or_wrong_output_folder_is_a_clear_error(run, tmp_path, where, words):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    refused(["evaluate", run, "--json", tmp_path / where], *words, folders=[run, tmp_path])


@pytest.mark.parametrize("command", ["evaluate", "predict", "attack", "compare", "data-check"])
def test_a_file_option_ending_in_a_slash_is_refused_not_written_as_a_file(run, phantoms_train, tmp_path, command):
    """`--json new/` names a folder: the CLI's Path would drop the slash and write a file called `new`."""
    target = f"{tmp_path / 'new'}/"
    args = {"evaluate": ["evaluate", run, "--json", target],
            "predict": ["predict", run, phantoms_train, "--out", target],
            "attack": ["attack", run, "--pgd", "--eps", "2/255", "--limit", "2", "--json", target],
            "compare": ["compare", run, run, "--json", target],
            "data-check": ["data", "check", phantoms_train, "--json", target]}[command]
    with nothing_lost(run, phantoms_train):
        result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "ends in a slash" in " ".join(result.output.replace("│", " ").split()), result.output  # rich's box
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_to_a_runs_file_is_the_runs_file(run, tmp_path):
    link = tmp_path / "innocent.json"
    os.symlink(run / "model.json", link)
    refused(["evaluate", run, "--json", link, "--overwrite"], "part of the run", folders=[run])


def test_save_images_needs_a_new_or_empty_folder(run, tmp_path):
    full = tmp_path / "adv"
    full.mkdir()
    (full / "keep.png").write_bytes(b"mine")
    refused(["attack", run, "--pgd", "--eps", "2/255", "--limit", "2", "--save-images", full], "not empty",
            "--overwrite", folders=[run, full])
    refused(["attack", run, "--pgd", "--eps", "2/255", "--limit", "2", "--save-images", run / "plots"],
            "part of the run", folders=[run])


def test_save_images_with_overwrite_replaces_an_earlier_attacks_images(run, tmp_path):
    """An --overwrite into a folder of an earlier attack's images kept those it did not write again: 8/255 images
    beside the 1/255 ones just made, with nothing to tell them apart. The user's other files stay."""
    adv = tmp_path / "adv"
    assert CliRunner().invoke(app, ["attack", str(run), "--fgsm", "--eps", "8/255", "--limit", "6", "--save-images",
                               str(adv)]).exit_code == 0
    assert len(list(adv.glob("*.png"))) == 6
    (adv / "notes.txt").write_text("mine")
    assert CliRunner().invoke(app, ["attack", str(run), "--fgsm", "--eps", "1/255", "--limit", "2", "--save-images",
                               str(adv), "--overwrite"]).exit_code == 0
    assert sorted(p.name[:5] for p in adv.glob("*.png")) == ["00000", "00001"]
    assert (adv / "notes.txt").read_text() == "mine" and not list(adv.glob(".*"))


def _unfinished(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "unfinished"
    shutil.copytree(run, copy)
    (copy / "report.json").unlink()
    return copy


def _flipped(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "flipped"
    shutil.copytree(run, copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01  # one bit of one weight: the file still loads
    (copy / "model.safetensors").write_bytes(bytes(weights))
    return copy


def _truncated(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "truncated"
    shutil.copytree(run, copy)
    weights = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    return copy


def _model_json(change):
    def damage(run: Path, tmp_path: Path) -> Path:
        copy = tmp_path / "damaged"
        shutil.copytree(run, copy)
        text = (copy / "model.json").read_text()
        (copy / "model.json").write_text(change(text))
        return copy
    return damage


def _drop(key):
    return lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != key})


def _report_json(text):
    def damage(run: Path, tmp_path: Path) -> Path:
        copy = tmp_path / "damaged"
        shutil.copytree(run, copy)
        (copy / "report.json").write_text(text)
        return copy
    return damage


def _set(key, value):
    return lambda text: json.dumps({**json.loads(text), key: value})


def _bad_recipe(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bad_recipe"
    shutil.copytree(run, copy)
    (copy / "recipe.yaml").write_text((copy / "recipe.yaml").read_text() + "surprise: 1\n")
    return copy


@pytest.mark.parametrize("damage, words", [
    (_unfinished, ["not finished", "report.json", "--resume"]),
    (_flipped, ["model.safetensors", "sha256"]),
    (_truncated, ["model.safetensors"]),
    (_model_json(lambda text: text[: len(text) // 2]), ["model.json", "damaged"]),
    (_model_json(lambda text: ""), ["model.json", "damaged"]),
    (_model_json(lambda text: "[1, 2]"), ["model.json", "mapping"]),
    (_model_json(_drop("classes")), ["model.json", "classes"]),
    (_model_json(_drop("data")), ["model.json", "data"]),
    (_model_json(_set("tta", ["identity", "rot90"])), ["model.json", "tta", "views"]),
    (_model_json(_set("tta", "hflip")), ["model.json", "tta", "views"]),
    (_model_json(_set("temperature", 1e-300)), ["model.json", "temperature", "[0.05, 20]"]),  # overflowed to NaN
    (_model_json(_drop("sha256")), ["model.json", "sha256"]),
    (_model_json(_set("image_size", 60000)), ["model.json", "image_size"]),
    (_model_json(_set("crop_fraction", float("nan"))), ["model.json", "crop_fraction"]),
    (_model_json(_set("channels", 3)), ["model.json", "channels"]),
    (_model_json(_set("classes", ["opacity", "normal"])), ["report.json", "model.json", "classes"]),
    (_model_json(_set("classes", ["normal", "normal"])), ["model.json", "classes"]),
    (_report_json("{not json"), ["report.json", "damaged"]),
    (_bad_recipe, ["recipe.yaml", "surprise"]),
])
@pytest.mark.parametrize("command", ["evaluate", "predict", "attack"])
def test_unfinished_and_damaged_runs_are_refused(run, phantoms_train, tmp_path, damage, words, command):
    bad = damage(run, tmp_path)
    args = {"evaluate": ["evaluate", bad], "predict": ["predict", bad, phantoms_train / "images"],
            "attack": ["attack", bad, "--pgd", "--eps", "2/255", "--limit", "2"]}[command]
    refused(args, bad, *words, folders=[bad, run, phantoms_train])


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null here")
def test_a_device_is_never_replaced_by_an_output(run):
    refused(["evaluate", run, "--json", "/dev/null", "--overwrite"], "not a regular file", folders=[run])
    assert Path("/dev/null").is_char_device()


def test_outputs_follow_the_umask_keep_a_replaced_files_mode_and_write_through_a_link(run, phantoms_train, tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.json"
        assert CliRunner().invoke(app, ["evaluate", str(run), "--json", str(fresh)]).exit_code == 0
        assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o640)
        assert CliRunner().invoke(app, ["evaluate", str(run), "--json", str(kept), "--overwrite"]).exit_code == 0
        assert kept.stat().st_mode & 0o777 == 0o640 and json.loads(kept.read_text())["n"] > 0
    finally:
        os.umask(old)
    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    result = CliRunner().invoke(app, ["predict", str(run), str(phantoms_train / "images" / "normal"), "--out",
                                      str(link), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target and target.read_text().startswith("path,prediction")


def test_a_long_output_name_is_used_and_an_impossible_one_is_refused(run, tmp_path):
    legal = tmp_path / ("r" * 245 + ".json")  # 250 bytes: legal, though a temporary name beside it would not be
    result = CliRunner().invoke(app, ["evaluate", str(run), "--json", str(legal)])
    assert result.exit_code == 0 and legal.is_file(), result.output
    refused(["evaluate", run, "--json", tmp_path / ("r" * 300 + ".json")], "cannot use that path", "255 bytes",
            folders=[run, tmp_path])


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """Default run names carry the second: a second run of the recipe then gets -2, never the first one's folder;
    an --out that another command creates between the check and mkdir is refused by name."""
    from datetime import datetime

    import medtricks.runs as runs

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 1, 9, 30, 0)

    monkeypatch.setattr(runs, "datetime", Frozen)
    made = [runs.new_run_dir("demo", root=tmp_path) for _ in range(3)]
    assert [p.name for p in made] == ["demo-20261201-093000", "demo-20261201-093000-2", "demo-20261201-093000-3"]
    assert all((p / "plots").is_dir() for p in made)
    check = runs.check_new_run_dir

    races = [tmp_path / "mine", tmp_path / "demo-20261201-093000-4"]

    def raced(out):
        check(out)
        if out in races:  # the other command's mkdir lands right after this one's check
            out.mkdir()

    monkeypatch.setattr(runs, "check_new_run_dir", raced)
    with pytest.raises(runs.RunError, match="another command created this run directory"):
        runs.new_run_dir("demo", out=tmp_path / "mine")
    assert runs.new_run_dir("demo", root=tmp_path).name == "demo-20261201-093000-5"  # -4 was taken meanwhile


def test_a_pipe_and_dash_are_refused_before_the_work(run, tmp_path, monkeypatch):
    """`--json /dev/stdout` into a pipe resolved to /proc/PID/fd/pipe:[N], a name that passed as a new file: the
    evaluation ran in full, then failed. `--json -` wrote a file named '-'."""
    read, write = os.pipe()
    try:
        refused(["evaluate", run, "--json", f"/dev/fd/{write}"], "not a regular file", "give a file name",
                folders=[run])
        refused(["predict", run, run.parent, "--out", f"/dev/fd/{write}"], "--out", "not a regular file",
                folders=[run])
    finally:
        os.close(read), os.close(write)
    monkeypatch.chdir(tmp_path)
    refused(["evaluate", run, "--json", "-"], "not standard output")
    assert not (tmp_path / "-").exists()


def test_ablate_never_writes_into_a_fine_tuning_run(run, phantoms_train):
    """ablate --out RUN added ablation.json, forest.png and runs/ to a finished run's root (explain --out refused it);
    an --out inside the run's own files was refused only by the first training."""
    common = ["ablate", "--recipe", "demo", "--data", phantoms_train, "--seeds", "1", "--tricks", "warmup"]
    refused([*common, "--out", run], "fine-tuning run", "model.json", folders=[run])
    refused([*common, "--out", run / "plots"], "part of the run", folders=[run])


def test_split_all_on_the_runs_own_data_warns_and_an_empty_split_advises_no_training_images(
        run, phantoms_train, phantoms, caplog):
    """The advice for an empty test split was '--split all', which scored the run's training images without a word."""
    import importlib

    from medtricks.data.pipeline import load_eval_data
    from medtricks.errors import DataError
    from medtricks.recipe import load_recipe

    evaluate = importlib.import_module("medtricks.finetune").evaluate
    for data, warned in [(None, True), (phantoms_train, True), (phantoms, False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="medtricks"):
            assert evaluate(run, data=data, split="all")["n"] > 0
        assert ("it includes the images the model was trained on" in caplog.text) == warned, (data, caplog.text)
    no_test = load_recipe("demo", ["data.split.train=0.8", "data.split.val=0.2", "data.split.test=0"]).data
    with pytest.raises(DataError, match="the test split is empty") as error:
        load_eval_data(no_test, phantoms_train, "test", 0, ("normal", "opacity"))
    assert "external labelled set with --data DIR --split all" in str(error.value)
    assert "use --split all" not in str(error.value)


def test_non_finite_probabilities_name_the_run_not_a_metric():
    """A damaged run (NaN weights under a matching sha256, both edited) gave "probs contain NaN" tracebacks in
    evaluate, attack, corrupt and ensemble, and NaN statistics from compare."""
    import numpy as np

    from medtricks.runs import RunError, finite
    from medtricks.scoring import EvalOutput

    good = EvalOutput(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), [None, None], 0.3)
    assert finite(good, "runs/x") is good
    bad = EvalOutput(np.array([0, 1]), np.array([[0.9, 0.1], [np.nan, np.nan]]), [None, None], 0.3)
    with pytest.raises(RunError, match=r"runs/x: the model gives non-finite probabilities for 1 of 2 images"):
        finite(bad, "runs/x")


def test_a_full_disk_while_saving_weights_is_named_not_a_safetensors_traceback(tmp_path, monkeypatch):
    """safetensors wrote the file itself and raised its own SafetensorError on ENOSPC, which no handler named."""
    import errno

    import torch

    from medtricks.files import OutputError
    from medtricks.runs import save_weights

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="model.safetensors: the disk is full"):
        save_weights(tmp_path / "model.safetensors", torch.nn.Linear(2, 2))
    assert not list(tmp_path.iterdir())  # no temporary file left


def test_a_record_folder_appears_complete_or_not_at_all(tmp_path):
    """attack and corrupt made RUN/attacks/<name> first and filled it file by file: killed, they left it half."""
    from medtricks.files import record_folder

    with pytest.raises(KeyboardInterrupt):
        with record_folder(tmp_path, "attacks", "pgd-1") as folder:
            (folder / "robustness.png").write_bytes(b"x")
            assert not (tmp_path / "attacks" / "pgd-1").exists()  # filled under a hidden name
            raise KeyboardInterrupt
    assert list((tmp_path / "attacks").iterdir()) == []
    with record_folder(tmp_path, "attacks", "pgd-2") as folder:
        (folder / "attack.json").write_text("{}")
    assert [p.name for p in (tmp_path / "attacks").iterdir()] == ["pgd-2"]
    assert (tmp_path / "attacks" / "pgd-2" / "attack.json").read_text() == "{}"


def test_a_planted_class_list_cannot_make_a_reader_build_a_huge_head(run, tmp_path):
    """model.json and report.json listing 2 million classes (under the 16 MB cap) made evaluate allocate 10 GB for
    the head before the weights were compared."""
    bad = tmp_path / "planted"
    shutil.copytree(run, bad)
    classes = [f"c{k}" for k in range(10_001)]
    for name in ("model.json", "report.json"):
        data = json.loads((bad / name).read_text())
        data.update({"classes": classes, **({"num_classes": len(classes)} if name == "model.json" else {})})
        (bad / name).write_text(json.dumps(data))
    recipe = yaml.safe_load((bad / "recipe.yaml").read_text())
    recipe["data"]["classes"] = None  # (else recipe.yaml and model.json would disagree first)
    (bad / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    refused(["evaluate", bad], "model.json", "classes", folders=[bad])


def test_more_distinct_labels_than_any_medical_task_is_a_wrong_label_column(tmp_path):
    from medtricks.data.sources import MAX_CLASSES, load_source
    from medtricks.errors import DataError

    rows = "".join(f"img{k}.png,patient {k}\n" for k in range(MAX_CLASSES + 1))
    (tmp_path / "labels.csv").write_text("path,label\n" + rows)
    with pytest.raises(DataError, match=f"{MAX_CLASSES + 1} distinct labels .* is the label column the right one"):
        load_source(tmp_path / "labels.csv")
