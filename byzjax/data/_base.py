"""The `Dataset` container and the deterministic stratified split."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A classification data set in host memory, split into train and test.

    Attributes:
      x_train: float32 features, shape (N, *feature_shape). Images are
        (N, H, W, C) scaled to [0, 1]; the synthetic data are unscaled Gaussian
        features (see `byzjax.data.load`).
      y_train: int32 labels in [0, num_classes), shape (N,).
      x_test: float32 features, shape (M, *feature_shape).
      y_test: int32 labels, shape (M,).
      num_classes: the number of classes.
      name: the registry name the data set was loaded under.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. (28, 28, 1)."""
        return tuple(self.x_train.shape[1:])


def check_fraction(test_fraction: float) -> float:
    """Returns `test_fraction` as a float after checking 0 < test_fraction < 1."""
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    return test_fraction


def stratified_split(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    name: str,
    seed: int,
    test_fraction: float,
) -> Dataset:
    """Splits (x, y) into train and test with the same class proportions.

    Class c's n_c examples are shuffled with `np.random.default_rng(seed)`, and
    the first round(test_fraction * n_c) go to the test set. Both sets are then
    shuffled (so neither is sorted by label). The split depends only on the data,
    `seed` and `test_fraction`.

    Args:
      x: features, shape (N, ...).
      y: integer labels, shape (N,).
      num_classes: the number of classes.
      name: the data set's registry name.
      seed: the seed of the split.
      test_fraction: the fraction of each class held out for testing.

    Returns:
      The `Dataset`, float32 features and int32 labels.
    """
    test_fraction = check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * members.size))
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    return Dataset(x[train], y[train], x[test], y[test], num_classes, name)
