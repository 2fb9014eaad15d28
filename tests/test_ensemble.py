"""`medtricks ensemble` (issue 18, part 5b): an ensemble of two runs evaluates to the average of their
probabilities, chooses its threshold on validation, opens like any run (evaluate, predict, compare, attack), and
refuses members of another task or another split."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.compare import compare
from medtricks.ensemble import EnsembleError, ensemble
from medtricks.finetune import evaluate, finetune, predict
from medtricks.metrics import choose_threshold
from medtricks.recipe import AttackSettings
from medtricks.robustness import decision_model, run_attack
from medtricks.runs import RunError, open_run

FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
        "train.batch_size=8", "train.eval_batch_size=16", "data.split.seed=7"]
runner = CliRunner()


@pytest.fixture(scope="module")
def members(phantoms_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    return [finetune("demo", data=phantoms_train, out=root / f"seed-{seed}", seed=seed, overrides=FAST)
            for seed in (0, 1)]  # two training seeds, one split (data.split.seed)


def test_an_ensemble_of_two_runs_is_the_average_of_their_probabilities(members, phantoms_train, tmp_path):
    run = ensemble(members, out=tmp_path / "ens", device="cpu")
    opened = [open_run(m, device="cpu") for m in members]
    ens = open_run(run, device="cpu")
    for split in ("val", "test"):
        outputs = [o.predict(o.dataset(None, split)) for o in opened]
        assert np.array_equal(outputs[0].labels, outputs[1].labels)  # the same images: one split
        averaged = ens.predict(ens.dataset(None, split))
        assert np.allclose(averaged.probs, (outputs[0].probs + outputs[1].probs) / 2, atol=1e-6)
        if split == "val":
            assert ens.threshold == choose_threshold(averaged.labels, averaged.probs, "youden")
    report = json.loads((run / "report.json").read_text())
    assert evaluate(run, split="test")["auroc"] == report["splits"]["test"]["auroc"]  # reopened from disk
    info = json.loads((run / "model.json").read_text())
    assert [m["run"] for m in info["members"]] == [str(m.resolve()) for m in members]

    images = sorted(phantoms_train.rglob("*.dcm"))[:2]
    rows = [predict(r, images, device="cpu") for r in (run, *members)]
    for key in (k for k in rows[0][0] if k.startswith("p_")):
        for together, *alone in zip(*rows, strict=True):
            assert together[key] == pytest.approx(np.mean([a[key] for a in alone]), abs=1e-6)
    result = compare(run, members[0], split="test", device="cpu")
    assert result["n"] == report["splits"]["test"]["n"]
    settings = AttackSettings(eps=(2 / 255,), steps=2)
    attacked = run_attack(decision_model(ens), ens.loader(ens.dataset(None, "test")), settings, ens.classes,
                          device=torch.device("cpu"))
    assert attacked["results"][0]["accuracy"] <= attacked["clean"]["accuracy"]  # gradients reach the members


def test_members_of_another_split_task_or_too_few_are_refused(members, phantoms_train, tmp_path):
    other_split = finetune("demo", data=phantoms_train, out=tmp_path / "other", seed=2,
                           overrides=[o for o in FAST if not o.startswith("data.split.seed")])
    with pytest.raises(EnsembleError, match="split seed"):
        ensemble([members[0], other_split], out=tmp_path / "e1")
    other_size = finetune("demo", data=phantoms_train, out=tmp_path / "size", overrides=[*FAST, "data.image_size=40"])
    with pytest.raises(EnsembleError, match="image_size"):
        ensemble([members[0], other_size], out=tmp_path / "e2")
    with pytest.raises(EnsembleError, match="2 to 16"):
        ensemble(members[:1], out=tmp_path / "e3")
    with pytest.raises(EnsembleError, match="twice"):
        ensemble([members[0], members[0]], out=tmp_path / "e4")
    (tmp_path / "taken").mkdir()
    with pytest.raises(RunError, match="never overwrites"):
        ensemble(members, out=tmp_path / "taken")
    assert not any((tmp_path / name).exists() for name in ("e1", "e2", "e3", "e4"))  # nothing left behind
    result = runner.invoke(app, ["ensemble", str(members[0]), "--out", str(tmp_path / "e5")])
    assert result.exit_code == 2 and "2 to 16" in result.output


def test_a_damaged_member_list_is_refused_before_any_model_is_built(members, tmp_path):
    run = ensemble(members, out=tmp_path / "ens", device="cpu")
    info = json.loads((run / "model.json").read_text())
    info["members"] = info["members"] * 9  # 18 members: more than any ensemble may hold
    (run / "model.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="members"):
        open_run(run, device="cpu")


def test_mean_sigmoid_logits_is_the_logit_of_the_mean_and_keeps_its_gradient_when_confident():
    from medtricks.models.ensemble import mean_sigmoid_logits

    torch.manual_seed(0)
    a, b = torch.randn(6, 3) * 3, torch.randn(6, 3) * 3
    mean = (a.sigmoid() + b.sigmoid()) / 2
    torch.testing.assert_close(mean_sigmoid_logits([a, b]).sigmoid(), mean)
    torch.testing.assert_close(mean_sigmoid_logits([a, b]), torch.logit(mean.double()).float(), atol=1e-4, rtol=1e-4)
    # members confident at z = 30 and 25: 1 - mean p rounds to 0 in float32, the logit stays finite and
    # differentiable (an attack on the ensemble needs that gradient)
    z = torch.tensor([30.0, 25.0], requires_grad=True)
    out = mean_sigmoid_logits([z[:1], z[1:]])
    out.backward()
    assert torch.isfinite(out).all() and out.item() > 25 and z.grad.abs().min() > 0.001


def test_an_ensemble_is_no_member_a_copy_is_no_second_member_and_nothing_resumes_over_one(members, tmp_path):
    import shutil

    from conftest import nothing_lost

    ens = ensemble(members, out=tmp_path / "ens", device="cpu")
    with pytest.raises(EnsembleError, match="is itself an ensemble"):
        ensemble([ens, members[0]], out=tmp_path / "nested", device="cpu")
    shutil.copytree(members[0], tmp_path / "copy")
    with pytest.raises(EnsembleError, match="the same weights"):
        ensemble([members[0], tmp_path / "copy"], out=tmp_path / "twice", device="cpu")
    assert not (tmp_path / "nested").exists() and not (tmp_path / "twice").exists()
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")  # a run path that is a link loop: named, no traceback
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    result = runner.invoke(app, ["ensemble", str(members[0]), str(tmp_path / "loop_a"), "--out", str(tmp_path / "l")])
    assert result.exit_code == 2 and "loop_a" in result.output and "Traceback" not in result.output, result.output
    (ens / "report.json").unlink()  # as if the ensemble were killed before its last write
    result = runner.invoke(app, ["evaluate", str(ens)])
    assert result.exit_code == 2 and "medtricks ensemble` again" in result.output and "--resume" not in result.output
    with nothing_lost(ens):
        result = runner.invoke(app, ["finetune", "--out", str(ens), "--resume"])
    assert result.exit_code == 2 and "is an ensemble" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_an_interrupted_ensemble_leaves_no_half_run(members, tmp_path, monkeypatch, stop):
    """Killed (or out of disk) between its files, ensemble left OUT with recipe.yaml and plots/: a rerun was refused
    and `finetune --out OUT --resume` trained a single model into it, named ensemble-demo."""
    import importlib

    module = importlib.import_module("medtricks.ensemble")
    real = module.write_json

    def stopped(path, data, replace=True):
        if path.name == "report.json":
            raise stop
        real(path, data, replace)

    monkeypatch.setattr(module, "write_json", stopped)
    with pytest.raises((KeyboardInterrupt, OSError)):
        ensemble(members, out=tmp_path / "ens")
    assert not (tmp_path / "ens").exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(module, "write_json", real)
    assert (ensemble(members, out=tmp_path / "ens") / "report.json").is_file()  # the same --out works again


def test_members_on_a_source_with_its_own_splits_may_differ_in_seed():
    """Two seeds on MedMNIST (or a manifest with a split column) take the same images, yet ensemble refused them
    for their 'split seed' and advised retraining; a seeded split of them still differs."""
    from types import SimpleNamespace

    from medtricks.ensemble import _split_settings
    from medtricks.recipe import load_recipe

    def member(seed, origin):
        return SimpleNamespace(recipe=load_recipe("demo", seed=seed), source="/data/set.npz",
                               info={"data": {"split_origin": origin}})

    own = "the source's own splits"
    assert _split_settings(member(0, own)) == _split_settings(member(1, own))
    carved = own + "; val carved from train (seed 0, 10% of train patients)"
    assert _split_settings(member(0, carved)) != _split_settings(member(1, carved))
