"""Each trick of medtricks.tricks.TRICKS, alone in the real `finetune` for one epoch of 2 optimizer steps on the tiny
phantom set, changes exactly what it should (the lr, the loss, the batch, the optimizer groups, the weights): checked
against a reference value computed here from the trick's definition, and against the same run without any trick
(same seed: same split, same batches). `train` traces a run by wrapping the functions `_finetune` and `fit` call."""

import importlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.testing import assert_close

import medtricks.train
from medtricks.models.surgery import residual_bns, stage_names
from medtricks.runs import open_run
from medtricks.tricks import TRICKS
from medtricks.tricks.amp import resolve_amp_dtype

FINETUNE = importlib.import_module("medtricks.finetune")  # the module: the attribute medtricks.finetune is the function
LR, BATCH, WEIGHT_DECAY, STEPS = 0.1, 8, 1e-3, 2
FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.device=cpu", "train.epochs=1",
        f"train.limit_train_batches={STEPS}", f"train.batch_size={BATCH}", "train.eval_batch_size=16",
        f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}"]
T, W = 4.0, 0.5  # distillation temperature and soft-term weight (the default)


def train(out: Path, data: Path, tricks: str = "{}", overrides: tuple[str, ...] = ()) -> dict:
    """Fine-tune the demo recipe with `tricks=<tricks>` (the recipe's own tricks replaced) and return its trace: per
    optimizer step ("steps") what the loss saw (logits, targets, images, loss, each param group's lr and lr_mult, the
    parameters before the update); per batch ("mixes") mix_batch's input and output; the model, optimizer, train
    sampler and dataset; the model's output dtypes in training; the raw weights after fit ("final"); the run dir."""
    trace = {"steps": [], "mixes": [], "dtypes": []}
    real = {name: getattr(FINETUNE, name) for name in ("build_model", "create_loader", "create_loss", "fit")}
    real_optimizer, real_mix = medtricks.train.create_optimizer, medtricks.train.mix_batch

    def build_model(*args, **kwargs):
        trace["model"] = model = real["build_model"](*args, **kwargs)
        model.register_forward_hook(lambda m, _, out: trace["dtypes"].append(out.dtype) if m.training else None)
        return model

    def create_optimizer(*args, **kwargs):
        trace["optimizer"] = real_optimizer(*args, **kwargs)
        return trace["optimizer"]

    def create_loader(dataset, batch_size, workers, sampler, **kwargs):
        if "sampler" not in trace:  # the first loader is the train loader
            trace["dataset"], trace["sampler"] = dataset, sampler
        return real["create_loader"](dataset, batch_size, workers, sampler, **kwargs)

    def create_loss(*args, **kwargs):
        loss_fn = real["create_loss"](*args, **kwargs)

        def traced(logits, targets, images):
            loss = loss_fn(logits, targets, images)
            groups = trace["optimizer"].param_groups
            trace["steps"].append({
                "logits": logits.detach().clone(), "targets": targets.clone(), "images": images.clone(),
                "loss": loss.detach().clone(), "lrs": [g["lr"] for g in groups],
                "lr_mults": [g["lr_mult"] for g in groups],
                "params": {n: p.detach().clone() for n, p in trace["model"].named_parameters()}})
            return loss
        return traced

    def mix_batch(images, labels, *args, **kwargs):
        mixed, targets = real_mix(images, labels, *args, **kwargs)
        trace["mixes"].append({"images": images.clone(), "labels": labels.clone(), "mixed": mixed.clone(),
                               "targets": targets.clone()})
        return mixed, targets

    def fit(model, *args, **kwargs):
        result = real["fit"](model, *args, **kwargs)
        trace["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}  # before the best epoch loads
        return result

    with pytest.MonkeyPatch.context() as patch:
        for name, wrapper in (("build_model", build_model), ("create_loader", create_loader),
                              ("create_loss", create_loss), ("fit", fit)):
            patch.setattr(FINETUNE, name, wrapper)
        patch.setattr(medtricks.train, "create_optimizer", create_optimizer)
        patch.setattr(medtricks.train, "mix_batch", mix_batch)
        patch.setattr(FINETUNE, "_plots", lambda *args: None)  # no part of training, half of a tiny run's time
        trace["run"] = FINETUNE.finetune("demo", data=data, out=out, overrides=[*FAST, f"tricks={tricks}", *overrides])
    assert len(trace["steps"]) == len(trace["mixes"]) == STEPS
    return trace


@pytest.fixture(scope="module")
def baseline(phantoms_train, tmp_path_factory) -> dict:
    """The run without any trick; its run directory is also the distillation teacher."""
    return train(tmp_path_factory.mktemp("baseline") / "run", phantoms_train)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def expect_lrs(trace: dict, factors: list[float], lr: float = LR) -> None:
    """Each step's param-group lrs are lr x the group's lr_mult x that step's factor."""
    for step, factor in zip(trace["steps"], factors, strict=True):
        assert_close(step["lrs"], [lr * mult * factor for mult in step["lr_mults"]])


def train_labels(trace: dict) -> list[int]:
    dataset = trace["dataset"]
    return [dataset.store.records[i]["label"] for i in dataset.indices]


def balanced_weights(trace: dict) -> torch.Tensor:
    """class_balance's loss weights n / (num_classes x count_c) of the run's train split, asserted to be != 1."""
    labels, classes = train_labels(trace), trace["model"].num_classes
    counts = Counter(labels)
    weights = torch.tensor([len(labels) / (classes * counts[c]) for c in range(classes)])
    assert differs(weights, torch.ones_like(weights)), f"the phantom train split is balanced ({counts})"
    return weights


def distilled(student, teacher, targets, weight=None):
    """Hinton et al.: (1 - W) CE(student, targets) + W T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    log_s, log_t = F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1).mean()
    return (1 - W) * F.cross_entropy(student, targets, weight=weight) + W * T**2 * kl


def check_distillation_loss(trace: dict, teacher_run: Path, weight=None) -> None:
    teacher = open_run(teacher_run, "cpu").model.eval()
    for step in trace["steps"]:
        with torch.no_grad():
            teacher_logits = teacher(step["images"]).float()
        expected = distilled(step["logits"], teacher_logits, step["targets"], weight)
        assert_close(step["loss"], expected)
        assert differs(step["loss"], F.cross_entropy(step["logits"], step["targets"], weight=weight))
        if weight is not None:  # the class weights act on the hard term
            assert differs(step["loss"], distilled(step["logits"], teacher_logits, step["targets"]))


def mixed_lam(mix: dict) -> float:
    """The mixing weight of a mixed batch: soft (N, C) targets summing to 1, and in a row whose partner has another
    class, the weight of the row's own class is lam."""
    targets, labels = mix["targets"], mix["labels"]
    assert targets.is_floating_point() and targets.shape == (len(labels), 2)
    assert_close(targets.sum(1), torch.ones(len(labels)))
    mixed_rows = (targets.max(1).values < 1).nonzero().flatten()
    assert len(mixed_rows) > 0, "no target row is mixed"
    assert differs(mix["mixed"], mix["images"])
    return targets[mixed_rows[0], labels[mixed_rows[0]]].item()


def check_linear_scaling(run, base):
    expect_lrs(run(), [1, 1], lr=LR * BATCH / 256)  # LinearScalingConfig.base_batch 256
    expect_lrs(base, [1, 1])


def check_warmup(run, base):
    trace = run("{epochs: 1}")  # 2 warmup steps, linear from 0: factors 0/2, 1/2
    expect_lrs(trace, [0, 0.5])
    expect_lrs(base, [1, 1])
    first, second = trace["steps"][0]["params"], trace["steps"][1]["params"]
    assert all(torch.equal(first[n], second[n]) for n in first)  # lr 0: the first step leaves the weights alone
    assert any(differs(base["steps"][0]["params"][n], base["steps"][1]["params"][n]) for n in first)


def check_cosine(run, base):
    expect_lrs(run(), [1, 0.5])  # (1 + cos(pi * step / 2)) / 2 with final_factor 0
    expect_lrs(base, [1, 1])


def check_step_decay(run, base):
    expect_lrs(run(), [1, 0.01])  # x 0.1 at steps 0.25 x 2, 0.5 x 2, 0.75 x 2: step 1 has passed two milestones
    expect_lrs(base, [1, 1])


def check_label_smoothing(run, base):
    trace = run("{smoothing: 0.1}")
    assert_close(trace["steps"][0]["logits"], base["steps"][0]["logits"])  # same model and batch: only the loss
    for step, plain in zip(trace["steps"], base["steps"], strict=True):
        assert_close(step["loss"], F.cross_entropy(step["logits"], step["targets"], label_smoothing=0.1))
        assert differs(step["loss"], F.cross_entropy(step["logits"], step["targets"]))
        assert_close(plain["loss"], F.cross_entropy(plain["logits"], plain["targets"]))


def check_unmixed_without_the_trick(trace, base):
    for mix, plain in zip(trace["mixes"], base["mixes"], strict=True):
        assert_close(mix["images"], plain["images"])  # the same batch goes into the mixing
        assert torch.equal(plain["mixed"], plain["images"]) and torch.equal(plain["targets"], plain["labels"])


def check_mixup(run, base):
    trace = run("{prob: 1.0}")
    check_unmixed_without_the_trick(trace, base)
    for mix, step in zip(trace["mixes"], trace["steps"], strict=True):
        x, out, lam = mix["images"], mix["mixed"], mixed_lam(mix)
        candidates = lam * x[:, None] + (1 - lam) * x[None]  # [i, j] = lam x_i + (1 - lam) x_j
        perm = (candidates - out[:, None]).flatten(2).abs().amax(2).argmin(1)
        assert sorted(perm.tolist()) == list(range(len(x)))
        assert_close(out, lam * x + (1 - lam) * x[perm])
        one_hot = F.one_hot(mix["labels"], 2).float()
        assert_close(mix["targets"], lam * one_hot + (1 - lam) * one_hot[perm])
        assert torch.equal(step["images"], out) and torch.equal(step["targets"], mix["targets"])  # trained on it


def check_cutmix(run, base):
    trace = run("{prob: 1.0}")
    check_unmixed_without_the_trick(trace, base)
    for mix, step in zip(trace["mixes"], trace["steps"], strict=True):
        x, out, lam = mix["images"], mix["mixed"], mixed_lam(mix)
        changed = (out != x).flatten(0, 1).any(0)  # (H, W): the pasted box, the same for every image
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = (..., slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert_close(1 - x[box][0, 0].numel() / changed.numel(), lam)  # targets mixed by the kept area
        perm = (out[box][:, None] - x[box][None]).flatten(2).abs().amax(2).argmin(1)
        assert sorted(perm.tolist()) == list(range(len(x)))
        expected = x.clone()
        expected[box] = x[perm][box]
        assert torch.equal(out, expected)  # each pixel is the image's own, or its partner's inside the box
        one_hot = F.one_hot(mix["labels"], 2).float()
        assert_close(mix["targets"], lam * one_hot + (1 - lam) * one_hot[perm])
        assert torch.equal(step["images"], out) and torch.equal(step["targets"], mix["targets"])


def check_distillation(run, base):
    trace = run(f"{{teacher: '{base['run']}', temperature: {T}}}")
    assert_close(trace["steps"][0]["logits"], base["steps"][0]["logits"])  # same student and batch: only the loss
    check_distillation_loss(trace, base["run"])


def weight_decays(trace: dict) -> dict[str, float]:
    """{parameter name: weight decay of its optimizer group}; every trainable parameter is in one group."""
    decay = {id(p): g["weight_decay"] for g in trace["optimizer"].param_groups for p in g["params"]}
    assert len(decay) == sum(len(g["params"]) for g in trace["optimizer"].param_groups)
    return {n: decay[id(p)] for n, p in trace["model"].named_parameters()}


def check_no_bias_decay(run, base):
    trace = run()
    params = dict(trace["model"].named_parameters())
    assert weight_decays(trace) == {n: 0.0 if p.ndim <= 1 else WEIGHT_DECAY for n, p in params.items()}
    assert set(weight_decays(base).values()) == {WEIGHT_DECAY}


def check_amp(run, base):
    if resolve_amp_dtype(torch.device("cpu"), "auto") is None:
        pytest.skip("this CPU has no fast bfloat16: amp (dtype auto) stays in float32")
    trace = run("{dtype: auto}")
    assert trace["dtypes"] == [torch.bfloat16] * STEPS and base["dtypes"] == [torch.float32] * STEPS
    step, plain = trace["steps"][0], base["steps"][0]  # the same model and batch, in bfloat16: other logits
    assert step["logits"].dtype == torch.float32 and differs(step["logits"], plain["logits"])


def check_zero_gamma(run, base):
    trace = run()
    model = trace["model"]
    gammas = {id(model.backbone.get_submodule(bn).weight) for bns in residual_bns(model, stage_names(model)).values()
              for bn in bns}
    names = {n for n, p in model.named_parameters() if id(p) in gammas}
    assert len(names) == len(gammas) > 0
    first, plain = trace["steps"][0]["params"], base["steps"][0]["params"]
    assert all(torch.all(first[n] == 0) for n in names) and all(torch.all(plain[n] != 0) for n in names)
    assert {n for n in first if not torch.equal(first[n], plain[n])} == names  # nothing else changed


def check_ema(run, base):
    trace = run("{decay: 0.9}")
    saved, final, after_first = load_file(trace["run"] / "model.safetensors"), trace["final"], trace["steps"][1]
    for name, weights in final.items():  # the first update copies, the second averages with decay 0.9
        assert_close(saved[name], 0.9 * after_first["params"][name] + 0.1 * weights)
    assert any(differs(saved[n], final[n]) for n in final)
    plain = load_file(base["run"] / "model.safetensors")
    assert all(torch.equal(plain[n], w) for n, w in base["final"].items())  # without: the last weights


def check_class_balance(run, base):
    trace = run("{mode: loss}")
    weights = balanced_weights(trace)
    for step in trace["steps"]:
        assert_close(step["loss"], F.cross_entropy(step["logits"], step["targets"], weight=weights))
        assert differs(step["loss"], F.cross_entropy(step["logits"], step["targets"]))
    trace = run("{mode: sampler}")
    labels = train_labels(trace)
    counts = Counter(labels)
    assert_close(trace["sampler"].weights, torch.tensor([1 / counts[y] for y in labels], dtype=torch.double))
    assert base["sampler"].weights is None
    trained = torch.cat([mix["labels"] for mix in trace["mixes"]]).tolist()
    assert trained == [labels[i] for i, _ in trace["sampler"]][:len(trained)]  # the batches come from the sampler
    assert trained != torch.cat([mix["labels"] for mix in base["mixes"]]).tolist()


def check_ordinal_decoding(run, base):
    trace = run("{}", ("data.ordinal=true",))  # the phantoms are binary: the trick needs 3 or more grades
    for step, reference in zip(trace["steps"], base["steps"], strict=True):  # a decision rule: training untouched
        assert_close(step["loss"], reference["loss"])
    for name, weights in trace["final"].items():
        assert_close(weights, base["final"][name])
    info, plain = (json.loads((t["run"] / "model.json").read_text()) for t in (trace, base))
    assert "grade_cuts" not in info and info["threshold"] == plain["threshold"]  # two classes keep their threshold


CHECKS = {"linear_scaling": check_linear_scaling, "warmup": check_warmup, "cosine": check_cosine,
          "step_decay": check_step_decay, "label_smoothing": check_label_smoothing, "mixup": check_mixup,
          "cutmix": check_cutmix, "distillation": check_distillation, "no_bias_decay": check_no_bias_decay,
          "amp": check_amp, "zero_gamma": check_zero_gamma, "ema": check_ema, "class_balance": check_class_balance,
          "ordinal_decoding": check_ordinal_decoding}


@pytest.mark.parametrize("name", list(TRICKS))
def test_trick_alone_changes_what_it_should(name, baseline, phantoms_train, tmp_path):
    assert name in CHECKS, f"new trick {name}: add a check of what it changes to CHECKS"
    runs = []

    def run(settings: str = "{}", overrides: tuple[str, ...] = ()) -> dict:
        runs.append(train(tmp_path / f"{name}-{len(runs)}", phantoms_train, f"{{{name}: {settings}}}", overrides))
        assert json.loads((runs[-1]["run"] / "report.json").read_text())["train"]["tricks"] == [name]
        return runs[-1]

    CHECKS[name](run, baseline)
    assert runs, f"the check of {name} never trained with it"


def test_distillation_hard_term_takes_the_class_weights(baseline, phantoms_train, tmp_path):
    tricks = f"{{distillation: {{teacher: '{baseline['run']}', temperature: {T}}}, class_balance: {{mode: loss}}}}"
    trace = train(tmp_path / "both", phantoms_train, tricks)
    check_distillation_loss(trace, baseline["run"], weight=balanced_weights(trace))
