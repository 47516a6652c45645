"""Mimic: all Byzantine workers copy one honest worker.

Harmless under iid data, harmful under heterogeneous data, because it over-weights
one worker's data distribution.

References:
  Karimireddy, He, Jaggi. "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022, arXiv:2006.09365 (`MimicAttacker`, `MimicVariantAttacker`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from byzjax._checks import require, static_int
from byzjax._numerics import HIGHEST, compute_dtype, row_mean
from byzjax.attacks._base import Attack, Params
from byzjax.attacks._simple import make_attack


def mimic(target: int = 0) -> Attack:
    """Mimic with a fixed target: every Byzantine row is ``x_{target}``.

    This is the registry entry (Karimireddy et al.'s `MimicAttacker(target_rank)`).
    ``target`` is a row index into the honest array, so the caller must keep the
    honest rows in worker order for the target to stay the same worker. It travels in
    params, so a sweep over targets is one program; a traced index out of range is
    clamped by the gather, a concrete one raises.

    Args:
      target: index of the honest worker to copy, 0 <= target < h.

    Returns:
      An Attack with params ``{"target": target}``.

    Raises:
      ValueError: a negative or non-integer target, or (when concrete) target >= h.
    """
    static_int(target, "mimic", "target")

    def body(key, x, params, f):
        t = params["target"]
        if isinstance(t, int):
            h = x.shape[0]
            require(0 <= t < h, "mimic", "0 <= target < h", target=t, h=h)
        return jnp.take(x, jnp.asarray(t), axis=0, mode="clip")

    return make_attack("mimic", {"target": target}, body)


class StatefulAttack(NamedTuple):
    """An attack that keeps state across steps (optax style).

    Attributes:
      init: ``init(honest[h, d]) -> state``, from an example honest array.
      apply: ``apply(key, honest[h, d], state, params, f) -> (byzantine[f, d],
        state)``.
      default_params: the sweepable parameters.
    """

    init: Callable[[jax.Array], Any]
    apply: Callable[[jax.Array, jax.Array, Any, Params, int], tuple[jax.Array, Any]]
    default_params: Params = ()


class MimicState(NamedTuple):
    """State of `mimic_heuristic`: step count, running mean, direction, target."""

    t: jax.Array
    mu: jax.Array
    z: jax.Array
    target: jax.Array


def mimic_heuristic(warmup: int, seed: int = 0, argmax: bool = True) -> StatefulAttack:
    """Mimic whose target is learned during a warm-up (`MimicVariantAttacker`).

    During the first `warmup` steps the attacker keeps a running mean ``mu_t`` of the
    honest means and a unit direction ``z_t`` of largest honest variance, refined by
    one power-iteration step per round,
    ``z <- t/(t+1) z + c/||c|| /(t+1)``, ``c = sum_i <x_i - mu, z> (x_i - mu)``,
    then normalised, with ``z_0 ~ N(0, I)`` from `seed`; each warm-up step it copies
    ``i* = argmax_i <x_i, z>`` (argmin with ``argmax=False``). After the warm-up it
    keeps copying the last ``i*``. Ties go to the lowest index (SPEC T0).

    Args:
      warmup: number of warm-up steps T_w >= 1 (static).
      seed: seed of the initial direction z_0.
      argmax: pick the largest projection (the reference code's default).

    Returns:
      A StatefulAttack without sweepable parameters.
    """
    warmup = static_int(warmup, "mimic_heuristic", "warmup", minimum=1)

    def init(honest):
        d = honest.shape[1]
        dtype = compute_dtype(honest.dtype)
        z0 = jax.random.normal(jax.random.PRNGKey(seed), (d,), dtype)
        zeros = jnp.zeros((d,), dtype)
        return MimicState(jnp.zeros((), jnp.int32), zeros, z0, jnp.zeros((), jnp.int32))

    def apply(key, honest, state, params, f):
        f = static_int(f, "mimic_heuristic", "f")
        x = honest.astype(compute_dtype(honest.dtype))
        t = state.t.astype(x.dtype)
        # At t = 0 the weights t/(t+1) vanish: mu is the first mean, z one power step
        # from z_0, exactly the reference code's separate initialisation.
        mu = t / (t + 1) * state.mu + row_mean(x) / (t + 1)
        centred = x - mu
        c = jnp.matmul(jnp.matmul(centred, state.z, precision=HIGHEST), centred)
        z = t / (t + 1) * state.z + c / jnp.linalg.norm(c) / (t + 1)
        z = z / jnp.linalg.norm(z)
        proj = jnp.matmul(x, z, precision=HIGHEST)
        pick = jnp.argmax(proj) if argmax else jnp.argmin(proj)
        warm = state.t < warmup
        new = MimicState(
            state.t + 1,
            jnp.where(warm, mu, state.mu),
            jnp.where(warm, z, state.z),
            jnp.where(warm, pick, state.target).astype(jnp.int32),
        )
        out = jnp.broadcast_to(x[new.target], (f, x.shape[1]))
        return out.astype(honest.dtype), new

    return StatefulAttack(init, apply, {})


ATTACKS = {"mimic": mimic}
