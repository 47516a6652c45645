"""byzjax.data: bundled data, synthetic generator, TFDS loaders, partitions."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

import byzjax.data as D


def _entropy(counts):
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _mean_label_entropy(table, labels, num_classes):
    return np.mean(
        [
            _entropy(np.bincount(labels[np.unique(row)], minlength=num_classes))
            for row in table
        ]
    )


def test_public_names():
    for name in D.__all__:
        assert hasattr(D, name)
    assert set(D.names()) == {
        "mnist5k",
        "digits",
        "synthetic",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
    }


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: cifar10, .*mnist5k"):
        D.load("imagenet")
    with pytest.raises(ValueError, match="unknown parameter"):
        D.load("digits", colour=True)


@pytest.mark.parametrize(
    "name, shape, n_train, n_test",
    [("mnist5k", (28, 28, 1), 4000, 1000), ("digits", (8, 8, 1), 1438, 359)],
)
def test_bundled_data(name, shape, n_train, n_test):
    ds = D.load(name)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.feature_shape == shape
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert 0.05 < ds.x_train.mean() < 0.5  # real images: mostly background
    for y in (ds.y_train, ds.y_test):
        counts = np.bincount(y, minlength=10)
        assert counts.min() >= 0.95 * counts.max() - 2  # balanced
    if name == "mnist5k":
        assert (np.bincount(ds.y_test) == 100).all()
    # the stored train order is shuffled, not sorted by class
    assert len(np.unique(ds.y_train[:50])) > 5
    # deterministic, and train and test disjoint (no image in both)
    again = D.load(name)
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    np.testing.assert_array_equal(ds.y_train, again.y_train)
    other = D.load(name, seed=1)
    assert not np.array_equal(other.y_train, ds.y_train)
    train_rows = {r.tobytes() for r in ds.x_train}
    overlap = sum(r.tobytes() in train_rows for r in ds.x_test)
    assert overlap <= 2  # allow exact duplicates within the source data


def test_test_fraction():
    ds = D.load("mnist5k", test_fraction=0.1)
    assert ds.x_test.shape[0] == 500 and ds.x_train.shape[0] == 4500
    with pytest.raises(ValueError, match="test_fraction"):
        D.load("digits", test_fraction=1.0)


def test_synthetic_is_seeded():
    a = D.load("synthetic", seed=3, num_examples=500, feature_shape=(4, 4, 1))
    b = D.load("synthetic", seed=3, num_examples=500, feature_shape=(4, 4, 1))
    c = D.load("synthetic", seed=4, num_examples=500, feature_shape=(4, 4, 1))
    for u, v in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (400, 4, 4, 1) and a.x_test.shape == (100, 4, 4, 1)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert (np.bincount(a.y_test) == 10).all()
    # well separated: nearest class mean classifies the test set well
    means = np.stack([a.x_train[a.y_train == k].mean(0) for k in range(10)])
    dist = ((a.x_test[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (dist.argmin(1) == a.y_test).mean() > 0.8


def test_iid_partition_is_disjoint_and_covers():
    labels = D.load("digits").y_train
    table = D.partition(0, labels, 7)
    n = labels.size
    assert table.shape == (7, n // 7) and table.dtype == np.int32
    flat = table.ravel()
    assert np.unique(flat).size == flat.size  # no overlap
    assert flat.min() >= 0 and flat.max() < n
    assert n - flat.size < 7  # covers all but the remainder
    np.testing.assert_array_equal(table, D.partition(0, labels, 7))
    assert not np.array_equal(table, D.partition(1, labels, 7))
    # a JAX key works too, deterministically
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        D.partition(key, labels, 7), D.partition(key, labels, 7)
    )


def test_dirichlet_partition_skew():
    labels = D.load("mnist5k").y_train
    iid = D.partition(0, labels, 20)
    skewed = D.partition(0, labels, 20, scheme="dirichlet", alpha=0.1)
    near_iid = D.partition(0, labels, 20, scheme="dirichlet", alpha=1000.0)
    h_iid = _mean_label_entropy(iid, labels, 10)
    h_skew = _mean_label_entropy(skewed, labels, 10)
    h_near = _mean_label_entropy(near_iid, labels, 10)
    assert h_skew < 0.6 * h_iid
    assert h_near > 0.97 * h_iid
    np.testing.assert_array_equal(
        skewed, D.partition(0, labels, 20, scheme="dirichlet", alpha=0.1)
    )
    for table in (skewed, near_iid):
        assert table.dtype == np.int32 and table.shape[0] == 20
        sizes = D.shard_sizes(table)
        assert sizes.min() >= 10 and sizes.max() == table.shape[1]
        # shards are disjoint and cover the data; the rest of a row cycles its shard
        shards = [row[:s] for row, s in zip(table, sizes, strict=True)]
        flat = np.concatenate(shards)
        assert np.unique(flat).size == flat.size == labels.size
        for row, s in zip(table, sizes, strict=True):
            np.testing.assert_array_equal(row, row[np.arange(row.size) % s])


def test_partition_errors():
    labels = np.arange(100) % 10
    with pytest.raises(ValueError, match="valid: iid, dirichlet"):
        D.partition(0, labels, 4, scheme="shards")
    with pytest.raises(ValueError, match="n_workers"):
        D.partition(0, labels, 0)
    with pytest.raises(ValueError, match="alpha"):
        D.partition(0, labels, 4, scheme="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="min_size"):
        D.partition(0, labels, 20, scheme="dirichlet", min_size=10)


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_tfds_missing_data_fails_fast(name, tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="data_dir"):
        D.load(name)
    with pytest.raises(ValueError, match="does not exist"):
        D.load(name, data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no"):
        D.load(name, data_dir=tmp_path)
    assert time.monotonic() - start < 5.0


def test_tfds_present_folder_but_no_data_fails_fast(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    (tmp_path / "mnist").mkdir()
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot read"):
        D.load("mnist", data_dir=tmp_path)
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize(
    "name, shape, num_classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)],
)
def test_tfds_loader_on_mock_data(name, shape, num_classes, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    (tmp_path / name).mkdir()  # our own fail-fast check looks for this folder
    with tfds.testing.mock_data(num_examples=12):
        ds = D.load(name, data_dir=tmp_path)
        small = D.load(name, data_dir=tmp_path, max_examples=5)
    assert ds.name == name and ds.num_classes == num_classes
    assert ds.x_train.shape == (12, *shape) and ds.x_test.shape == (12, *shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ((0 <= ds.y_train) & (ds.y_train < num_classes)).all()
    assert small.x_train.shape == (5, *shape)
