"""The classifier-feature Fréchet distance (fd_classifier, not FID) on sklearn digits."""

import torch

from fmm.evaluation.classifier_features import ClassifierFeatures
from fmm.experiment.data import prepare, read_labels, read_part


def test_classifier_distance_is_zero_on_itself_and_grows_with_noise(tmp_path):
    prepare("digits", str(tmp_path / "digits"), shards=2)
    images, _ = read_part(str(tmp_path / "digits"))
    labels = read_labels(str(tmp_path / "digits"))
    assert len(labels) == len(images) == 1797
    features = ClassifierFeatures(images, labels, "digits", cache_dir=str(tmp_path / "cache"))
    assert features.accuracy(images, labels) > 0.9  # it learned the dataset
    assert abs(features.distance(images, images)) < 1e-4  # rounding on dead (zero-variance) features
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    values = [features.distance(images, (images + s * noise).clamp(-1, 1)) for s in (0.1, 0.3, 0.8)]
    assert 0 < values[0] < values[1] < values[2], values
    again = ClassifierFeatures(images, labels, "digits", cache_dir=str(tmp_path / "cache"))  # from the cache
    assert again.path == features.path and abs(again.distance(images[:500], images[500:1000]) -
                                               features.distance(images[:500], images[500:1000])) < 1e-9
