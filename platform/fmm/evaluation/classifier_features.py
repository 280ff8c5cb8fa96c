"""A Fréchet distance in the feature space of a small classifier trained on the same dataset.

A fast CPU stand-in for FID on small image sets (digits, Fashion-MNIST): a four-layer CNN is
trained to classify the dataset, and the distance is the Fréchet distance between the Gaussian
fits of its 128-d penultimate features. It is reported as `fd_classifier`, never as FID: its
values are not comparable with any published FID. The classifier is trained once per dataset
and cached (keyed by the dataset's name, size and shape).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fmm.evaluation.fid import frechet, statistics


class SmallClassifier(nn.Module):
    def __init__(self, channels: int, classes: int, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.feature = nn.Linear(2 * width * 16, 128)
        self.head = nn.Linear(128, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2) if min(x.shape[-2:]) >= 16 else F.relu(self.conv1(x))
        h = self.pool(F.relu(self.conv2(h)))
        return F.relu(self.feature(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3, seed: int = 0) -> SmallClassifier:
    torch.manual_seed(seed)
    model = SmallClassifier(images.shape[1], int(labels.max()) + 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(128):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


class ClassifierFeatures:
    """Features of a classifier trained (or loaded from the cache) for one labelled image dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, key: str, cache_dir: str | None = None,
                 epochs: int = 3):
        cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "fmm", "classifier")
        tag = hashlib.sha256(json.dumps([key, len(images), list(images.shape[1:]), epochs]).encode()).hexdigest()[:16]
        path = os.path.join(cache, f"{key}-{tag}.pt")
        if os.path.isfile(path):
            self.model = SmallClassifier(images.shape[1], int(labels.max()) + 1)
            self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.model.eval()
        else:
            self.model = train_classifier(images, labels, epochs)
            os.makedirs(cache, exist_ok=True)
            torch.save(self.model.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
        self.path = path

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 512) -> np.ndarray:
        return torch.cat([self.model.features(images[i:i + batch].float()) for i in range(0, len(images), batch)]
                         ).double().numpy()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.model(images.float()).argmax(1) == labels).float().mean())

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return frechet(*statistics(self(a)), *statistics(self(b)))
