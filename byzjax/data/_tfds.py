"""TensorFlow Datasets loaders (optional extra `byzjax[tfds]`), never downloading.

`tfds.data_source` reads prepared array_record files without TensorFlow. The data
must already sit under `data_dir`, prepared on a machine with internet access, e.g.
`tfds build cifar10 --data_dir DIR --file_format array_record`. byzjax always
passes `download=False` and checks `data_dir` before touching tfds, because an
offline download attempt stalls for minutes in retries.

References:
  LeCun et al., 1998 (MNIST); H. Xiao, K. Rasul, R. Vollgraf. Fashion-MNIST,
  arXiv:1708.07747; A. Krizhevsky. Learning multiple layers of features from tiny
  images, 2009 (CIFAR-10/100).
"""

from __future__ import annotations

import os

import numpy as np

from byzjax.data._base import Dataset

# registry name -> (tfds name, number of classes); CIFAR-100 uses the fine labels.
_TFDS = {
    "mnist": ("mnist", 10),
    "fashion_mnist": ("fashion_mnist", 10),
    "cifar10": ("cifar10", 10),
    "cifar100": ("cifar100", 100),
}
_CHUNK = 4096


def _check_data_dir(name: str, tfds_name: str, data_dir) -> str:
    """Fails fast, before importing tfds, unless data_dir/tfds_name exists."""
    hint = (
        f"prepare it where the internet is reachable with `tfds build {tfds_name} "
        f"--data_dir DIR --file_format array_record` and pass data_dir=DIR "
        "(byzjax never downloads)"
    )
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir: {hint}")
    data_dir = os.fspath(os.path.expanduser(data_dir))
    if not os.path.isdir(data_dir):
        raise ValueError(
            f"dataset {name!r}: data_dir {data_dir!r} does not exist; {hint}"
        )
    if not os.path.isdir(os.path.join(data_dir, tfds_name)):
        raise ValueError(
            f"dataset {name!r}: data_dir {data_dir!r} holds no {tfds_name!r} folder; "
            f"{hint}"
        )
    return data_dir


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "the TFDS loaders need the optional extra: pip install 'byzjax[tfds]' "
            "(tensorflow-datasets, importlib_resources, pillow)"
        ) from err
    return tfds


def _read_all(source, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decodes every (or the first `limit`) example of a tfds data source."""
    n = len(source) if limit is None else min(limit, len(source))
    examples = []
    for start in range(0, n, _CHUNK):
        keys = list(range(start, min(start + _CHUNK, n)))
        try:
            examples.extend(source.__getitems__(keys))
        except TypeError:  # tfds.testing.mock_data's source lacks batched reads
            examples.extend(source[i] for i in keys)
    images = np.stack([np.asarray(ex["image"]) for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples], np.int32)
    return images, labels


def _loader(name: str):
    tfds_name, num_classes = _TFDS[name]

    def load(*, data_dir=None, seed: int = 0, max_examples: int | None = None):
        data_dir = _check_data_dir(name, tfds_name, data_dir)
        del seed  # the official split is used as stored
        tfds = _import_tfds()
        try:
            train, test = tfds.data_source(
                tfds_name,
                split=["train", "test"],
                data_dir=data_dir,
                download=False,
                try_gcs=False,
            )
        except Exception as err:  # tfds raises several types for missing data
            raise ValueError(
                f"dataset {name!r}: tfds cannot read {tfds_name!r} (array_record "
                f"format) under data_dir {data_dir!r}: {err}"
            ) from err
        x_train, y_train = _read_all(train, max_examples)
        x_test, y_test = _read_all(test, max_examples)
        return Dataset(
            (x_train.astype(np.float32) / 255.0),
            y_train,
            (x_test.astype(np.float32) / 255.0),
            y_test,
            num_classes,
            name,
        )

    load.__name__ = name
    load.__doc__ = f"""TFDS {tfds_name!r}: official train/test split, images in [0, 1].

    Args:
      data_dir: a TFDS data directory holding {tfds_name!r} in array_record format.
      seed: unused (the official split and stored order are kept).
      max_examples: read at most this many examples from each split.

    Returns:
      The `Dataset` {name!r}, features (N, H, W, C) float32, {num_classes} classes.

    Raises:
      ValueError: data_dir missing, or not holding the prepared data set.
      ImportError: tensorflow-datasets is not installed.
    """
    return load


LOADERS = {name: _loader(name) for name in _TFDS}
