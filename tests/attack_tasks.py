"""Small attack tasks shared by the attack tests: CNNs trained in seconds on synthetic grey 16 x 16 images, accurate
but attackable, so every invariant is checked where an attack actually changes predictions."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

SIDE = 16


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images in [0, 1]: a noisy mid-grey background with a broad Gaussian blob, brighter (class 1) or darker
    (class 0) by a random amplitude, so margins vary and robust accuracy falls gradually with eps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32),
                            indexing="ij")
    cy, cx = torch.rand(n, 1, 1, generator=g) * 6 + 5, torch.rand(n, 1, 1, generator=g) * 6 + 5
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 32)
    amplitude = (torch.rand(n, 1, 1, generator=g) * 0.3 + 0.02) * (labels * 2 - 1).view(-1, 1, 1)
    background = 0.5 + 0.05 * torch.randn(n, SIDE, SIDE, generator=g)
    return (background + amplitude * blob).clamp(0, 1)[:, None], labels


def tiny_cnn(outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, outputs))


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, single_logit: bool) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        idx = torch.randint(0, len(images), (128,))
        out = model(images[idx])
        if single_logit:
            loss = F.binary_cross_entropy_with_logits(out[:, 0], labels[idx].float())
        else:
            loss = F.cross_entropy(out, labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def blob_task() -> SimpleNamespace:
    """A two-logit and a single-logit CNN trained on 1024 blobs; 400 held-out blobs to attack."""
    train_x, train_y = blobs(1024, seed=0)
    torch.manual_seed(0)
    model = train(tiny_cnn(2), train_x, train_y, single_logit=False)
    torch.manual_seed(1)
    single = train(tiny_cnn(1), train_x, train_y, single_logit=True)
    x, y = blobs(400, seed=1)
    return SimpleNamespace(model=model, single=single, x=x, y=y)


SPOT_CENTRES = torch.tensor([[4.0, 4.0], [4.0, 11.0], [11.0, 4.0], [11.0, 11.0], [7.5, 7.5]])


def spots(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Five classes: where a faint spot sits on a noisy grey background (four quadrants or the centre, jittered);
    moving a spot takes removing one and drawing another, so the classes are not one intensity direction apart."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SPOT_CENTRES), (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32),
                            indexing="ij")
    centre = SPOT_CENTRES[labels] + torch.randn(n, 2, generator=g)
    spot = torch.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / 6)
    amplitude = (torch.rand(n, generator=g) * 0.25 + 0.05).view(-1, 1, 1)
    background = 0.5 + 0.08 * torch.randn(n, SIDE, SIDE, generator=g)
    return (background + amplitude * spot).clamp(0, 1)[:, None], labels


def spot_task() -> SimpleNamespace:
    """A 5-class CNN trained on 2048 spot images (~94% accurate on 400 held-out ones, ~35% at eps 8/255)."""
    train_x, train_y = spots(2048, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * (SIDE // 2) ** 2, len(SPOT_CENTRES)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    for _ in range(400):
        idx = torch.randint(0, len(train_x), (128,))
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = spots(400, seed=1)
    return SimpleNamespace(model=model.eval(), x=x, y=y)
