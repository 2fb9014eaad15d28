"""The bag of tricks: each trick against a small reference written here, and every config and method card."""

import dataclasses
import logging
import math
import re
import sys
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from medtricks.data.sampling import SeededSampler
from medtricks.errors import RecipeError
from medtricks.models import apply_freeze, create_model, stage_parameter_groups
from medtricks.tricks import TRICKS
from medtricks.tricks.amp import autocast, create_grad_scaler, resolve_amp_dtype
from medtricks.tricks.class_balance import balanced_sample_weights, class_weights
from medtricks.tricks.cosine import cosine_factor
from medtricks.tricks.distillation import distillation_loss
from medtricks.tricks.ema import create_ema, ema_update
from medtricks.tricks.label_smoothing import label_smoothing_loss
from medtricks.tricks.linear_scaling import scaled_lr
from medtricks.tricks.mixup import cutmix_batch, mix_probability_gate, mixup_batch, one_hot
from medtricks.tricks.no_bias_decay import create_param_groups
from medtricks.tricks.step_decay import step_factor
from medtricks.tricks.warmup import warmup_factor
from medtricks.tricks.zero_gamma import apply_zero_gamma

README = Path(__file__).resolve().parents[1] / "README.md"
STUDY_SEGMENT = (r"(?:RetinaMNIST|ISIC UDA-1|PneumoniaMNIST)(?: [a-z]+)? "
                 r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\], (?:helps|hurts|no detectable effect)")
CARD_LINES = ("Paper:", "Hook:", "Defaults:", "Interactions:", "Measured effect:")
HOOKS = ("schedule", "loss", "optimizer groups", "model build", "training step", "decision rule")


# --- every trick ---------------------------------------------------------------------------------------------------

def test_tricks_order():
    assert list(TRICKS) == ["linear_scaling", "warmup", "cosine", "step_decay", "label_smoothing", "mixup", "cutmix",
                            "distillation", "no_bias_decay", "amp", "zero_gamma", "ema", "class_balance",
                            "ordinal_decoding"]
    listed = sys.modules["medtricks.tricks"].__doc__
    assert all(f"- {name}:" in listed for name in TRICKS)


@pytest.mark.parametrize("name", list(TRICKS))
def test_config_defaults_and_method_card(name):
    cls = TRICKS[name]
    config = cls(teacher="x") if name == "distillation" else cls()
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.extra = 1
    typing.get_type_hints(cls)  # the recipe loader resolves the field annotations of every config
    doc = sys.modules[cls.__module__].__doc__
    lines = doc.splitlines()
    for prefix in CARD_LINES:
        assert sum(line.startswith(prefix) for line in lines) == 1, f"{cls.__module__}: one {prefix!r} line"
    effect = next(i for i, line in enumerate(lines) if line.startswith("Measured effect:"))
    end = next((i for i in range(effect + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    card = " ".join([lines[effect].removeprefix("Measured effect:"), *lines[effect + 1:end]]).split()
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{name}` |"))
    if "not yet measured" in row:  # the card and the README tricks table say the same
        assert card == ["not", "yet", "measured"], card
    else:  # the study's "RetinaMNIST +0.003 [-0.020, +0.026], no detectable effect" per data set, each in the row;
        # a card the study did not measure: its exploratory "AUROC -0.015 [-0.034, +0.004]"
        text = " ".join(card)
        if "³" in row:  # measured by the study
            study = re.findall(STUDY_SEGMENT, text)
            assert study and all(segment in row for segment in study), (card, row)
        else:  # exploratory numbers (the mixup card also holds cutmix's), or a decision rule's kappa
            numbers = re.findall(r"(?:AUROC|quadratic kappa) [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", text)
            assert any(segment in row for segment in numbers), (card, row)
    hook = next(line for line in lines if line.startswith("Hook:"))
    assert any(h in hook for h in HOOKS), hook
    assert all(len(line) <= 120 for line in lines)


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("linear_scaling", {"base_batch": 0}, "tricks.linear_scaling.base_batch = 0"),
    ("warmup", {"epochs": -1.0}, "tricks.warmup.epochs = -1.0"),
    ("cosine", {"final_factor": 1.5}, "tricks.cosine.final_factor = 1.5"),
    ("step_decay", {"milestones": (0.5, 0.25)}, "tricks.step_decay.milestones"),
    ("step_decay", {"milestones": (0.5, 1.0)}, "tricks.step_decay.milestones"),
    ("step_decay", {"gamma": 0.0}, "tricks.step_decay.gamma = 0.0"),
    ("label_smoothing", {"smoothing": 1.0}, "tricks.label_smoothing.smoothing = 1.0"),
    ("mixup", {"alpha": -1}, "tricks.mixup.alpha = -1 must be > 0"),
    ("mixup", {"prob": 0.0}, "tricks.mixup.prob = 0.0"),
    ("cutmix", {"alpha": 0.0}, "tricks.cutmix.alpha = 0.0"),
    ("distillation", {"teacher": ""}, "tricks.distillation.teacher"),
    ("distillation", {"teacher": "x", "temperature": 0.0}, "tricks.distillation.temperature = 0.0"),
    ("distillation", {"teacher": "x", "weight": 1.5}, "tricks.distillation.weight = 1.5"),
    ("amp", {"dtype": "fp8"}, "tricks.amp.dtype = 'fp8'"),
    ("zero_gamma", {"beta": "one"}, "tricks.zero_gamma.beta = 'one'"),
    ("zero_gamma", {"stages": ()}, "tricks.zero_gamma.stages"),
    ("ema", {"decay": 1.0}, "tricks.ema.decay = 1.0"),
    ("class_balance", {"mode": "oversample"}, "tricks.class_balance.mode = 'oversample'"),
])
def test_config_rejects_bad_values(name, kwargs, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        TRICKS[name](**kwargs)


def test_config_tuples_from_lists():
    assert TRICKS["step_decay"](milestones=[0.3, 0.6]).milestones == (0.3, 0.6)
    assert TRICKS["zero_gamma"](stages=["layer4"]).stages == ("layer4",)


# --- schedule ------------------------------------------------------------------------------------------------------

def test_linear_scaling():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 64) == pytest.approx(0.025)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.05, 32, base_batch=32) == pytest.approx(0.05)


def test_warmup_factor():
    assert warmup_factor(0, 100) == 0.0
    assert warmup_factor(25, 100) == pytest.approx(0.25)
    assert warmup_factor(50, 100) == pytest.approx(0.5)
    assert warmup_factor(100, 100) == 1.0
    assert warmup_factor(1000, 100) == 1.0
    assert warmup_factor(0, 0) == 1.0


def test_cosine_factor():
    def reference(step, start, total, final):
        t = min(max((step - start) / (total - start), 0.0), 1.0)
        return final + (1 - final) * (1 + math.cos(math.pi * t)) / 2

    assert cosine_factor(0, 10, 110) == 1.0
    assert cosine_factor(10, 10, 110) == 1.0
    assert cosine_factor(60, 10, 110) == pytest.approx(0.5)
    assert cosine_factor(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(110, 10, 110, final_factor=0.1) == pytest.approx(0.1)
    assert cosine_factor(500, 10, 110, final_factor=0.1) == pytest.approx(0.1)
    for step in (11, 37, 85, 109):
        assert cosine_factor(step, 10, 110, 0.05) == pytest.approx(reference(step, 10, 110, 0.05))
    values = [cosine_factor(s, 10, 110) for s in range(0, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_step_factor_at_each_milestone():
    milestones, total = (0.25, 0.5, 0.75), 120  # the paper: /10 at 30, 60, 90 of 120 epochs
    expected = {0: 1.0, 29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01, 89: 0.01, 90: 0.001, 119: 0.001, 120: 0.001}
    for step, factor in expected.items():
        assert step_factor(step, total, milestones, 0.1) == pytest.approx(factor), step
    assert 0.07 * 100 > 7  # float rounding: the milestone at step 7 must still count
    assert step_factor(7, 100, (0.07,), 0.5) == 0.5 and step_factor(6, 100, (0.07,), 0.5) == 1.0


# --- loss ----------------------------------------------------------------------------------------------------------

def test_label_smoothing_loss_matches_formula():
    torch.manual_seed(0)
    logits, labels, s = torch.randn(8, 5), torch.randint(0, 5, (8,)), 0.1
    logp = torch.log_softmax(logits, dim=1)
    reference = (-(1 - s) * logp[torch.arange(8), labels] - s / 5 * logp.sum(dim=1)).mean()
    torch.testing.assert_close(label_smoothing_loss(logits, labels, smoothing=s), reference)

    soft = torch.softmax(torch.randn(8, 5), dim=1)
    reference_soft = (-((1 - s) * soft + s / 5) * logp).sum(dim=1).mean()
    torch.testing.assert_close(label_smoothing_loss(logits, soft, smoothing=s), reference_soft)
    plain = -logp[torch.arange(8), labels].mean()
    torch.testing.assert_close(label_smoothing_loss(logits, labels, smoothing=0.0), plain)


def test_distillation_loss_matches_formula():
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))

    def kl(t):
        p_t, logp_t, logp_s = torch.softmax(teacher / t, 1), torch.log_softmax(teacher / t, 1), torch.log_softmax(
            student / t, 1)
        return (p_t * (logp_t - logp_s)).sum() / 6

    ce = -torch.log_softmax(student, 1)[torch.arange(6), labels].mean()
    for t, w in ((1.0, 0.5), (4.0, 0.3), (20.0, 0.5)):
        torch.testing.assert_close(distillation_loss(student, teacher, labels, t, w), (1 - w) * ce + w * t**2 * kl(t))
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, 0.0), ce)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, 1.0), 16 * kl(4.0))
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, 1.0),  # smoothing: hard term only
                               distillation_loss(student, teacher, labels, 4.0, 1.0, smoothing=0.2))
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, 0.0, smoothing=0.2),
                               label_smoothing_loss(student, labels, smoothing=0.2))
    assert distillation_loss(student, student, labels, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)

    soft = one_hot(labels, 4)
    torch.testing.assert_close(distillation_loss(student, teacher, soft, 4.0, 0.5),
                               distillation_loss(student, teacher, labels, 4.0, 0.5))
    s = student.clone().requires_grad_(True)
    tch = teacher.clone().requires_grad_(True)
    distillation_loss(s, tch, labels, 4.0, 0.5).backward()
    assert s.grad is not None and tch.grad is None


def test_class_weights():
    torch.testing.assert_close(class_weights([0, 0, 0, 1], 2), torch.tensor([4 / 6, 4 / 2]))
    torch.testing.assert_close(class_weights([0, 1, 2, 0, 1, 2], 3), torch.ones(3))


def test_class_weights_missing_class(caplog):
    with caplog.at_level(logging.WARNING, logger="medtricks.tricks.class_balance"):
        weights = class_weights([0, 0, 2], 3)
    torch.testing.assert_close(weights, torch.tensor([3 / 6, 0.0, 3 / 3]))
    assert "[1]" in caplog.text and "no training image" in caplog.text
    with pytest.raises(ValueError, match="class indices"):
        class_weights([0, 3], 3)


def test_balanced_sampling_draws_classes_equally():
    """class_balance mode sampler as the trainer runs it: the seeded sampler draws with balanced_sample_weights."""
    labels = [0] * 90 + [1] * 10
    torch.testing.assert_close(balanced_sample_weights(labels), torch.tensor([1 / 90] * 90 + [1 / 10] * 10,
                                                                             dtype=torch.double))
    sampler = SeededSampler(len(labels), seed=0, weights=balanced_sample_weights(labels))
    drawn = []
    for epoch in range(1, 21):
        sampler.set_epoch(epoch)
        drawn += [labels[i] for i, _ in sampler]
    assert len(drawn) == 2000
    assert 0.45 < sum(drawn) / len(drawn) < 0.55  # class 1 is 10% of the images, ~50% of the draws
    plain = SeededSampler(len(labels), seed=0)
    plain.set_epoch(1)
    assert sum(labels[i] for i, _ in plain) == 10  # without weights: each image once


# --- training step -------------------------------------------------------------------------------------------------

def _recover_pairs(targets: torch.Tensor) -> tuple[list[int], float | None]:
    """perm and lam from mixed one-hot targets of sample i = class i: row i = lam e_i + (1 - lam) e_perm(i)."""
    perm, lam = [], None
    for i, row in enumerate(targets):
        others = row.clone()
        others[i] = 0
        j = int(others.argmax()) if others.max() > 0 else i
        perm.append(j)
        if j != i:
            lam = float(row[i])
    return perm, lam


def test_mixup_batch_is_the_convex_combination():
    images, targets = torch.rand(6, 3, 8, 8), one_hot(torch.arange(6), 6)
    assert targets.dtype == torch.float32
    rng_state = torch.get_rng_state()
    mixed, mixed_targets = mixup_batch(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), rng_state)  # randomness comes only from the generator
    perm, lam = _recover_pairs(mixed_targets)
    assert sorted(perm) == list(range(6)) and lam is not None and 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[perm])
    torch.testing.assert_close(mixed_targets, lam * targets + (1 - lam) * targets[perm])
    torch.testing.assert_close(mixed_targets.sum(dim=1), torch.ones(6))

    again = mixup_batch(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], mixed_targets)
    other = mixup_batch(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other[0], mixed)
    with pytest.raises(ValueError, match="one_hot"):
        mixup_batch(images, torch.arange(6), alpha=0.2)


def test_cutmix_box_area_matches_targets():
    n, height, width = 4, 16, 20
    images = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, height, width).contiguous()
    targets = one_hot(torch.arange(n), n)
    checked = 0
    for seed in range(12):
        mixed, mixed_targets = cutmix_batch(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(seed))
        again = cutmix_batch(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again[0], mixed) and torch.equal(again[1], mixed_targets)
        torch.testing.assert_close(mixed_targets.sum(dim=1), torch.ones(n))
        for i in range(n):
            inside = mixed[i, 0] != images[i, 0]
            area = int(inside.sum())
            if area:  # the pasted pixels form one box, all from one partner image, on every channel
                rows, cols = inside.any(dim=1).nonzero(), inside.any(dim=0).nonzero()
                assert area == len(rows) * len(cols) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                partner = int(mixed[i, 0][inside][0]) - 1
                assert torch.all(mixed[i][:, inside] == partner + 1)
                lam = 1 - area / (height * width)
                expected = lam * targets[i] + (1 - lam) * targets[partner]
                torch.testing.assert_close(mixed_targets[i], expected)
                checked += 1
            else:
                torch.testing.assert_close(mixed_targets[i], targets[i])  # an empty box, or one from itself
    assert checked >= 10


def test_mix_probability_gate():
    generator = torch.Generator().manual_seed(0)
    assert all(mix_probability_gate(1.0, generator) for _ in range(10))
    gates = [mix_probability_gate(0.3, generator) for _ in range(1000)]
    assert 0.25 < sum(gates) / len(gates) < 0.35


def test_ema_update_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = create_ema(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema_update(ema, model)  # the first update copies
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    old_weight, old_mean = ema.module[0].weight.detach().clone(), ema.module[1].running_mean.clone()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        model(torch.randn(16, 3))  # changes the BN running mean
    ema_update(ema, model)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * old_weight + 0.1 * model[0].weight)
    torch.testing.assert_close(ema.module[1].running_mean, 0.9 * old_mean + 0.1 * model[1].running_mean)


def test_ema_warns_when_the_average_would_still_be_the_pretrained_start(caplog):
    """decay 0.98 over 75 steps (NIH pneumonia_cxr folds: 5 steps x 15 epochs) keeps 0.98^74 = 22% on the first
    step's weights; the warning names the share and the largest decay that keeps it at 5% (0.05^(1/74) = 0.960)."""
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="medtricks.tricks.ema"):
        create_ema(model, 0.98, steps=75)
    assert "22%" in caplog.text and "at most 0.960" in caplog.text and "75 optimizer steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medtricks.tricks.ema"):
        create_ema(model, 0.98, steps=400)  # 0.98^399 < 0.001
        create_ema(model, 0.96, steps=75)  # 0.96^74 = 4.9%
    assert not caplog.text


def test_amp_bfloat16_on_cpu():
    cpu = torch.device("cpu")
    dtype = resolve_amp_dtype(cpu)
    if dtype is None:
        pytest.skip("this CPU has no fast bfloat16 (resolve_amp_dtype returned None)")
    assert dtype == torch.bfloat16 and resolve_amp_dtype(cpu, "bfloat16") == torch.bfloat16
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(cpu, dtype):
        assert torch.mm(a, b).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert torch.mm(a, b).dtype == torch.float32
    assert not create_grad_scaler(cpu, dtype).is_enabled()


def test_amp_resolve_rules(monkeypatch, caplog):
    cpu = torch.device("cpu")
    with pytest.raises(RecipeError, match="float16.*use bfloat16"):
        resolve_amp_dtype(cpu, "float16")
    with pytest.raises(RecipeError, match="tricks.amp.dtype"):
        resolve_amp_dtype(cpu, "half")
    monkeypatch.setattr("medtricks.tricks.amp._cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="medtricks.tricks.amp"):
        assert resolve_amp_dtype(cpu) is None
    assert "float32" in caplog.text
    scaler = create_grad_scaler(cpu, None)
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss  # a disabled scaler passes the loss through


# --- optimizer groups and model build ------------------------------------------------------------------------------

def test_no_bias_decay_groups(caplog):
    model = create_model("resnet18", 2, 3, weights="none")
    apply_freeze(model, ["stem"])
    stage_groups = stage_parameter_groups(model, {"head": 10.0})
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = {id(p) for p in trainable if p.ndim <= 1}
    with caplog.at_level(logging.INFO, logger="medtricks.tricks.no_bias_decay"):
        groups = create_param_groups(stage_groups, weight_decay=1e-4, no_bias_decay=True)
    no_decay = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    decay = [p for g in groups if g["weight_decay"] == 1e-4 for p in g["params"]]
    assert {id(p) for p in no_decay} == flat and len(no_decay) == len(flat)
    assert {id(p) for p in decay} == {id(p) for p in trainable} - flat
    assert len(no_decay) + len(decay) == len(trainable)
    assert all(set(g) == {"params", "weight_decay", "lr_mult", "stage", "decay"} and g["params"] for g in groups)
    assert all(g["decay"] == (g["weight_decay"] > 0) for g in groups)
    assert {g["lr_mult"] for g in groups if g["stage"] == "head"} == {10.0}
    assert "stem" not in {g["stage"] for g in groups}
    assert f"on {len(decay)} tensors" in caplog.text and f"none on {len(no_decay)} tensors" in caplog.text
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # the optimizer takes the groups as they are

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medtricks.tricks.no_bias_decay"):
        everything = create_param_groups(stage_groups, weight_decay=1e-4, no_bias_decay=False)
    assert len(everything) == len(stage_groups) and all(g["decay"] and g["weight_decay"] == 1e-4 for g in everything)
    assert f"on {len(trainable)} tensors" in caplog.text and "none on 0 tensors" in caplog.text


def test_zero_gamma_zeroes_bn2_of_every_basic_block():
    model = create_model("resnet18", 2, 3, weights="none")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1.0, 1.0)
    before = {name: m.bias.clone() for name, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    names = apply_zero_gamma(model)
    blocks = [name for name, m in model.backbone.named_modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8 and sorted(names) == sorted(f"{b}.bn2" for b in blocks)
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert bool((module.weight == 0).all()) == (name in names), name
            assert torch.equal(module.bias, before[name])  # beta keep

    model = create_model("resnet18", 2, 3, weights="none")
    assert sorted(apply_zero_gamma(model, ["layer4"], beta="zero")) == ["layer4.0.bn2", "layer4.1.bn2"]
    assert torch.all(model.backbone.layer4[1].bn2.bias == 0) and torch.all(model.backbone.layer3[1].bn2.weight == 1)
    with pytest.raises(RecipeError, match="tricks.zero_gamma.stages.*layer9"):
        apply_zero_gamma(model, ["layer9"])
    with pytest.raises(RecipeError, match="tricks.zero_gamma.stages.*stem"):
        apply_zero_gamma(model, ["stem"])
