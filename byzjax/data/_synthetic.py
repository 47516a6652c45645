"""A seeded Gaussian-mixture classification problem, for fast tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from byzjax.data._base import Dataset, stratified_split


def synthetic(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    num_examples: int = 2000,
    num_classes: int = 10,
    feature_shape: Sequence[int] = (20,),
    separation: float = 3.0,
    noise: float = 1.0,
    data_dir=None,
) -> Dataset:
    """Balanced Gaussian mixture: x = mu_y + noise * z, z ~ N(0, I_d).

    The class means mu_c are drawn once from N(0, I_d) and rescaled to norm
    `separation`, so the problem gets harder as `separation / noise` falls.
    Labels are balanced (c = i mod num_classes, then shuffled). Everything,
    including the stratified split, is a function of `seed`. Features are not
    scaled to [0, 1]: they are centred, with per-coordinate variance about
    noise**2 + separation**2 / d.

    Args:
      seed: the seed of the means, the samples and the split.
      test_fraction: the fraction of each class held out.
      num_examples: the total number of examples (train plus test).
      num_classes: the number of mixture components, one a class.
      feature_shape: the shape of one example, e.g. (20,) or (8, 8, 1) for
        convolutional models; d = prod(feature_shape).
      separation: the norm of each class mean.
      noise: the standard deviation of the isotropic noise.
      data_dir: ignored.

    Returns:
      The `Dataset` "synthetic".

    Raises:
      ValueError: a non-positive size or a class count below 2.
    """
    del data_dir
    feature_shape = tuple(int(s) for s in feature_shape)
    dim = math.prod(feature_shape)
    if num_classes < 2 or num_examples < 2 * num_classes or dim < 1:
        raise ValueError(
            "synthetic needs num_classes >= 2, num_examples >= 2 * num_classes and "
            f"a non-empty feature_shape; got {num_classes}, {num_examples}, "
            f"{feature_shape}"
        )
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_classes, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.permutation(np.arange(num_examples) % num_classes)
    x = means[y] + noise * rng.standard_normal((num_examples, dim))
    x = x.reshape((num_examples, *feature_shape))
    return stratified_split(
        x,
        y,
        num_classes=num_classes,
        name="synthetic",
        seed=seed,
        test_fraction=test_fraction,
    )


LOADERS = {"synthetic": synthetic}
