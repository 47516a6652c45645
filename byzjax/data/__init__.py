"""Data sets and worker partitions, by registry name.

`names()` lists the data sets and `load(name)` returns a `Dataset` of numpy arrays.
"mnist5k", "digits" and "synthetic" work offline from files that install with the
package; "mnist", "fashion_mnist", "cifar10" and "cifar100" read a prepared TFDS
`data_dir` (optional extra `byzjax[tfds]`) and never download. `partition` splits
the training set among workers as a fixed-size index table.
"""

from __future__ import annotations

from byzjax._registry import call_builder, lookup, merge
from byzjax.data import _offline, _synthetic, _tfds
from byzjax.data._base import Dataset, stratified_split
from byzjax.data._partition import partition, shard_sizes

__all__ = [
    "Dataset",
    "load",
    "names",
    "partition",
    "shard_sizes",
    "stratified_split",
]

_LOADERS = merge("dataset", _offline.LOADERS, _synthetic.LOADERS, _tfds.LOADERS)


def names() -> tuple[str, ...]:
    """Registry names of the data sets, sorted."""
    return tuple(sorted(_LOADERS))


def load(
    name: str, *, data_dir=None, seed: int = 0, test_fraction: float | None = None, **kw
) -> Dataset:
    """Loads data set `name` as host numpy arrays.

    Offline sets ("mnist5k", "digits", "synthetic") have no official test split:
    each class is split deterministically by `seed`, `test_fraction` (default 0.2)
    of it held out. TFDS sets keep their official split and take no
    `test_fraction`.

    Args:
      name: a registry name from `names()`.
      data_dir: a prepared TFDS data directory (TFDS sets only; ignored otherwise).
      seed: the seed of the stratified split (and of the synthetic data).
      test_fraction: the held-out fraction of each class (offline sets only);
        None keeps the data set's default.
      **kw: the data set's own options, e.g. `feature_shape` for "synthetic" or
        `max_examples` for the TFDS sets.

    Returns:
      A `Dataset`: float32 features (N, *feature_shape), int32 labels.

    Raises:
      ValueError: an unknown name or option, or missing TFDS data (raised at once,
        without any download attempt).
    """
    loader = lookup("dataset", _LOADERS, name)
    params = dict(data_dir=data_dir, seed=seed, **kw)
    if test_fraction is not None:
        params["test_fraction"] = test_fraction
    return call_builder("dataset", name, loader, params)
