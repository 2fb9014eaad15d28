"""APGD and the AutoAttack-style ensemble: cross-checked against torchattacks' APGD / APGDT on a 5-class model, at
least as strong as PGD-10 on every model (5-class, binary two-logit, binary single-logit, with non-0.5 thresholds),
and the margin loss defined where AutoAttack's DLR is not (two classes)."""

from types import SimpleNamespace

import pytest
import torch
from attack_tasks import SIDE, blob_task, spot_task

from medtricks.apgd import apgd, autoattack, checkpoints, ensemble_members, margin_loss
from medtricks.attacks import AttackError, ThresholdShift, TwoLogits, pgd


@pytest.fixture(scope="module")
def spot() -> SimpleNamespace:
    return spot_task()


@pytest.fixture(scope="module")
def blob() -> SimpleNamespace:
    return blob_task()


@pytest.fixture(scope="module")
def torchattacks():
    return pytest.importorskip("torchattacks", reason="torchattacks is the reference implementation to compare with")


def robust(broken: torch.Tensor) -> float:
    return 1.0 - float(broken.float().mean())


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def correct(model, images, labels) -> torch.Tensor:
    with torch.no_grad():
        return TwoLogits(model)(images).argmax(1) == labels


def test_checkpoints_are_croce_and_heins():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # p_j = 0.22, 0.41, 0.57, 0.70, ... (sec. 3.2)
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert checkpoints(1) == []


def test_the_spot_task_is_learned_but_attackable(spot):
    assert float(correct(spot.model, spot.x, spot.y).float().mean()) >= 0.9
    _, broken = pgd(spot.model, spot.x, spot.y, 8 / 255, generator=seeded(), return_broken=True)
    assert 0.2 <= robust(broken) <= 0.6


@pytest.mark.parametrize("eps", [4 / 255, 8 / 255])
def test_apgd_ce_matches_torchattacks_apgd(spot, torchattacks, eps):
    """Same model, images, eps and steps: robust accuracy within one point (400 images: 4 images)."""
    _, broken = apgd(spot.model, spot.x, spot.y, eps, steps=25, generator=seeded(), return_broken=True)
    theirs = torchattacks.APGD(spot.model, eps=eps, steps=25, seed=0, loss="ce")(spot.x, spot.y)
    theirs_robust = float(correct(spot.model, theirs, spot.y).float().mean())
    assert 0.2 <= theirs_robust <= 0.8, theirs_robust  # partly robust: the comparison can tell a difference
    assert abs(robust(broken) - theirs_robust) <= 0.01, (robust(broken), theirs_robust)


@pytest.mark.parametrize("eps", [4 / 255, 8 / 255])
def test_targeted_members_match_torchattacks_apgdt(spot, torchattacks, eps):
    """APGD-T towards each of the 4 other classes (most likely first) on the DLR-T margin: robust accuracy within
    one point of torchattacks' APGDT with the same targets."""
    _, _, members = autoattack(spot.model, spot.x, spot.y, eps, steps=25, generator=seeded(), n_targets=4)
    targeted = torch.stack([broken for name, broken in members.items() if name.startswith("apgd-t")]).any(0)
    theirs = torchattacks.APGDT(spot.model, eps=eps, steps=25, n_classes=5, seed=0)(spot.x, spot.y)
    theirs_robust = float(correct(spot.model, theirs, spot.y).float().mean())
    assert sorted(members) == ["apgd-ce", "apgd-t1", "apgd-t2", "apgd-t3", "apgd-t4"]
    assert 0.2 <= theirs_robust <= 0.8, theirs_robust
    assert abs(robust(targeted) - theirs_robust) <= 0.01, (robust(targeted), theirs_robust)


def _decision(model, threshold):
    return ThresholdShift(TwoLogits(model), threshold).eval() if threshold is not None else model


@pytest.mark.parametrize("which, threshold", [
    ("spot", None), ("two_logit", None), ("two_logit", 0.3), ("single_logit", None), ("single_logit", 0.8)])
@pytest.mark.parametrize("eps", [4 / 255, 16 / 255])
def test_the_ensemble_is_at_least_as_strong_as_pgd10(spot, blob, which, threshold, eps):
    task = spot if which == "spot" else blob
    model = _decision({"spot": spot.model, "two_logit": blob.model, "single_logit": blob.single}[which], threshold)
    images, labels = task.x[:200], task.y[:200]
    _, pgd_broken = pgd(model, images, labels, eps, steps=10, generator=seeded(), return_broken=True)
    adv, broken, members = autoattack(model, images, labels, eps, steps=10, generator=seeded())
    assert robust(broken) <= robust(pgd_broken), (robust(broken), robust(pgd_broken))
    assert robust(broken) < float(correct(model, images, labels).float().mean())  # it breaks something
    assert torch.equal(broken, torch.stack(list(members.values())).any(0) | ~correct(model, images, labels))
    if which != "spot":
        assert list(members) == ["apgd-ce", "apgd-margin"]  # no DLR on two classes
    delta = adv - images
    assert float(delta.abs().max()) <= eps + 1e-6 and 0 <= float(adv.min()) and float(adv.max()) <= 1


def test_binary_margin_is_the_distance_from_the_runs_threshold(blob):
    """On the decision model the margin is > 0 exactly when p1 >= threshold flips the true label."""
    threshold = 0.3
    net = ThresholdShift(TwoLogits(blob.single), threshold)
    with torch.no_grad():
        logits, p1 = net(blob.x), torch.sigmoid(blob.single(blob.x)[:, 0])
    margin = margin_loss(logits, blob.y)
    wrong = (p1 >= threshold).long() != blob.y
    assert torch.isfinite(margin).all()
    assert torch.equal(margin > 0, wrong)


def test_autoattack_dlr_is_undefined_on_two_classes_and_ours_is(blob, torchattacks):
    """Why medtricks has its own margin: the DLR loss indexes the third largest logit."""
    with pytest.raises(IndexError):
        torchattacks.APGD(blob.model, eps=8 / 255, steps=2, loss="dlr")(blob.x[:8], blob.y[:8])
    adv, broken = apgd(blob.model, blob.x[:8], blob.y[:8], 8 / 255, steps=2, loss="margin", return_broken=True)
    assert adv.shape == blob.x[:8].shape and broken.dtype == torch.bool


def test_margin_loss_signs_for_many_classes():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0]])
    labels = torch.tensor([0, 0])
    untargeted = margin_loss(logits, labels)
    assert untargeted[0] < 0 < untargeted[1]  # right / wrong
    torch.testing.assert_close(untargeted, torch.tensor([(1 - 3) / (3 - 0), (2 - 0) / (2 - 0)]))
    targeted = margin_loss(logits, labels, torch.tensor([2, 2]))
    torch.testing.assert_close(targeted, torch.tensor([(0 - 3) / (3 - 0.5 * (0 - 1)), (1 - 0) / (2 - 0.5 * (0 - 1))]))


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("linf", 0.5), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_apgd_stays_in_the_eps_ball_and_in_0_1(blob, norm, eps, loss):
    g = torch.Generator().manual_seed(3)
    images = torch.cat([blob.x[:32], torch.zeros(1, 1, SIDE, SIDE), torch.ones(1, 1, SIDE, SIDE),
                        torch.rand(4, 1, SIDE, SIDE, generator=g)])
    labels = torch.cat([blob.y[:32], torch.tensor([0, 1, 0, 1])[:2], torch.randint(0, 2, (4,), generator=g)])
    adv = apgd(blob.model, images, labels, eps, steps=8, norm=norm, loss=loss, restarts=2, generator=seeded())
    size = (adv - images).flatten(1).abs().amax(1) if norm == "linf" else (adv - images).flatten(1).norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1


def test_apgd_is_reproducible_and_eps_zero_is_clean(blob):
    first = apgd(blob.model, blob.x[:64], blob.y[:64], 8 / 255, steps=5, generator=seeded())
    again = apgd(blob.model, blob.x[:64], blob.y[:64], 8 / 255, steps=5, generator=seeded())
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    clean, broken = apgd(blob.model, blob.x[:64], blob.y[:64], 0.0, return_broken=True)
    torch.testing.assert_close(clean, blob.x[:64], rtol=0, atol=0)
    assert torch.equal(broken, ~correct(blob.model, blob.x[:64], blob.y[:64]))


class Bowl(torch.nn.Module):
    """Logits (-k ||x - centre||^2, 0): the cross-entropy of class 1 peaks at x = centre, an interior point of the
    eps ball, where a fixed sign step of 2 eps can only bounce around it."""

    def __init__(self, centre: torch.Tensor):
        super().__init__()
        self.register_buffer("centre", centre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance = ((x - self.centre) ** 2).flatten(1).sum(1)
        return torch.stack([-10 * distance, torch.zeros_like(distance)], dim=1)


def test_the_step_size_halves_at_checkpoints_until_apgd_settles_on_an_interior_maximum():
    """What the checkpoints are for: the step starts at 2 eps and halves where the loss stops rising, so APGD ends
    within a small fraction of eps of the maximum; with a step that never halved it would stay about eps away."""
    eps, g = 16 / 255, torch.Generator().manual_seed(0)
    centre = 0.25 + 0.5 * torch.rand(1, 1, 4, 4, generator=g)
    images = centre + (torch.rand(8, 1, 4, 4, generator=g) - 0.5) * eps  # the centre is inside every image's ball
    adv = apgd(Bowl(centre), images, torch.ones(8, dtype=torch.long), eps, steps=100, generator=seeded())
    assert float((adv - centre).abs().max()) <= eps / 16


@pytest.mark.parametrize("bad", [{"loss": "dlr"}, {"steps": 0}, {"restarts": 0}, {"norm": "l1"}, {"eps": -1.0},
                                 {"eps": float("nan")}])
def test_apgd_rejects_bad_settings(blob, bad):
    options = {"eps": 8 / 255, **bad}
    with pytest.raises(AttackError):
        apgd(blob.model, blob.x[:4], blob.y[:4], **options)


def test_ensemble_members():
    assert [m.name for m in ensemble_members(2)] == ["apgd-ce", "apgd-margin"]
    assert [m.name for m in ensemble_members(3)] == ["apgd-ce", "apgd-t1", "apgd-t2"]
    assert len(ensemble_members(20)) == 1 + 9  # AutoAttack's standard: the 9 most likely wrong classes


def test_inputs_made_in_inference_mode_can_be_attacked(blob):
    with torch.inference_mode():
        images, labels = blob.x[:16].clone(), TwoLogits(blob.model)(blob.x[:16]).argmax(1)
    adv = apgd(blob.model, images, labels, 8 / 255, steps=2)
    adv_ensemble = autoattack(blob.model, images, labels, 8 / 255, steps=2)[0]
    assert adv.shape == adv_ensemble.shape == images.shape
