"""Splitting a training set among workers: iid, or label-skewed by a Dirichlet prior.

The result is one fixed-size (n_workers, m) int32 index table, so the simulator can
put it on device and sample each worker's minibatch with `jax.random` inside the
compiled loop (`x_train[table[i, jax.random.randint(key, (b,), 0, m)]]`).

References:
  T.-M. H. Hsu, H. Qi, M. Brown. Measuring the effects of non-identical data
  distribution for federated visual classification. arXiv:1909.06335, 2019.
  Q. Li, Y. Diao, Q. Chen, B. He. Federated learning on non-IID data silos: an
  experimental study (NIID-Bench). arXiv:2102.02079, 2021.
"""

from __future__ import annotations

import numpy as np

_SCHEMES = ("iid", "dirichlet")
_MAX_TRIES = 1000


def _rng(key_or_seed) -> np.random.Generator:
    """A numpy Generator from an int seed, a Generator, or a JAX PRNG key."""
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, int | np.integer):
        return np.random.default_rng(int(key_or_seed))
    import jax  # a JAX key: derive the numpy seed from it, deterministically

    seed = jax.random.randint(key_or_seed, (), 0, np.iinfo(np.int32).max)
    return np.random.default_rng(int(seed))


def _pad(shards: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Stacks shards into (n, max size) rows: each shard shuffled, then cycled."""
    m = max(s.size for s in shards)
    rows = [rng.permutation(s)[np.arange(m) % s.size] for s in shards]
    return np.stack(rows).astype(np.int32)


def partition(
    key_or_seed,
    labels,
    n_workers: int,
    *,
    scheme: str = "iid",
    alpha: float = 1.0,
    min_size: int = 10,
) -> np.ndarray:
    """Assigns training examples to workers; returns an (n_workers, m) index table.

    iid: a random permutation cut into n_workers equal shards of m = N //
    n_workers; the N mod n_workers left over (fewer than n_workers) are dropped.
    Shards are disjoint.

    dirichlet (Hsu et al., 2019): for each class c, proportions
    p_c ~ Dir(alpha * 1_n) split class c's shuffled examples among the workers;
    small alpha gives each worker few classes, large alpha approaches iid. As in
    NIID-Bench (Li et al., 2021), a worker already holding N / n examples gets no
    more of later classes, and the whole draw is repeated until every worker holds
    at least `min_size` examples. Shards are disjoint and cover all N examples, but
    their sizes differ: each row holds its worker's shard in a random order in its
    first `size_i` entries and is then padded to m = max_i size_i by cycling the
    same order. Sampling a uniform column of row i thus samples the shard with
    weights in {k, k+1}/m (k = m // size_i); for exact uniform sampling draw
    j ~ U{0..size_i-1} with `shard_sizes(table)[i]`.

    Args:
      key_or_seed: an int seed, a `np.random.Generator`, or a JAX PRNG key.
      labels: the int labels of the training set, shape (N,).
      n_workers: the number of workers (honest and Byzantine alike).
      scheme: "iid" or "dirichlet".
      alpha: the Dirichlet concentration (dirichlet only), > 0.
      min_size: the fewest examples a worker may hold (dirichlet only).

    Returns:
      An int32 array (n_workers, m) of indices into the training set.

    Raises:
      ValueError: an unknown scheme, n_workers out of range, alpha <= 0, or a
        min_size that cannot be met.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 1 <= n_workers <= n:
        raise ValueError(
            f"n_workers must lie in [1, {n}] (the data size), got {n_workers}"
        )
    rng = _rng(key_or_seed)
    if scheme == "iid":
        m = n // n_workers
        return (
            rng.permutation(n)[: n_workers * m].reshape(n_workers, m).astype(np.int32)
        )
    if scheme != "dirichlet":
        raise ValueError(
            f"unknown partition scheme {scheme!r}; valid: {', '.join(_SCHEMES)}"
        )
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if min_size * n_workers > n:
        raise ValueError(
            f"min_size={min_size} for {n_workers} workers needs at least "
            f"{min_size * n_workers} examples, got {n}"
        )
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_MAX_TRIES):
        shards = _dirichlet_draw(rng, classes, n_workers, alpha, cap=n / n_workers)
        if min(s.size for s in shards) >= min_size:
            return _pad(shards, rng)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_TRIES} gave every one of "
        f"{n_workers} workers >= {min_size} examples; raise alpha or lower min_size"
    )


def _dirichlet_draw(rng, classes, n_workers, alpha, cap) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    held = np.zeros(n_workers)
    for members in classes:
        members = rng.permutation(members)
        p = rng.dirichlet(np.full(n_workers, alpha))
        p = p * (held < cap)  # full workers take no more (NIID-Bench)
        p = p / p.sum() if p.sum() > 0 else np.full(n_workers, 1.0 / n_workers)
        cuts = (np.cumsum(p)[:-1] * members.size).astype(int)
        for i, piece in enumerate(np.split(members, cuts)):
            parts[i].append(piece)
            held[i] += piece.size
    return [np.concatenate(p) for p in parts]


def shard_sizes(table: np.ndarray) -> np.ndarray:
    """The number of distinct examples in each row of a `partition` table, (n,)."""
    table = np.asarray(table)
    return np.array([np.unique(row).size for row in table], np.int32)
