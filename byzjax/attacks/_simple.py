"""Simple omniscient attacks and crash faults: sign flip, Gaussian, large opposite.

Also the helper `make_attack` that every attack family in this package uses to check
its static counts, promote the honest gradients to float32 and return the Byzantine
rows in the input dtype.

References:
  Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017, arXiv:1703.02757 (omniscient
  large opposite vector, Gaussian noise sigma = 200).
  Xie, Koyejo, Gupta. "Zeno: Distributed Stochastic Gradient Descent with
  Suspicion-based Fault-tolerance", ICML 2019, arXiv:1805.10032 (Gaussian, sign flip
  and omniscient attacks in its code).
  Allen-Zhu, Ebrahimian, Li, Alistarh. "Byzantine-Resilient Non-Convex Stochastic
  Gradient Descent", ICLR 2021, arXiv:2012.14368 (sign flipping u_i = -g_i).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from byzjax._checks import require, static_int
from byzjax._numerics import dot_mean, kernel_input, promote
from byzjax.attacks._base import Attack, Params

Body = Callable[[jax.Array, jax.Array, Params, int], jax.Array]


def choice(value, choices: Sequence[str], attack: str, name: str) -> str:
    """Returns `value` if it is one of `choices`, else raises a ValueError."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{attack}: {name} must be one of {valid}, got {value!r}")
    return value


def make_attack(
    name: str, default_params: Params, body: Body, min_honest=1, stored=False
) -> Attack:
    """Wraps `body(key, honest32[h, d], params, f)` as an Attack.

    The wrapper checks that `f` is a static int >= 0 and that the honest array is
    (h, d) with h >= `min_honest`, computes in float32 at least (bfloat16 sums lose
    digits), broadcasts a (d,) result to the f rows (the attacks in which all
    Byzantine workers send one shared vector) and returns the input dtype.
    With `stored`, a body that reads the rows only through helpers that widen
    them as they read (`dot_mean`, `mean_std`) or exactly (a row taken whole)
    gets bfloat16 rows as they are where the CPU kernels read them: widened
    first, they were a float32 copy of the honest rows, written then read again
    (ALIE at (100, 1e6) took 67.7 ms in bfloat16 against 29.9 in float32).

    Args:
      name: the attack's registry name, used in error messages.
      default_params: the sweepable parameters.
      body: returns a (d,) shared vector or the (f, d) Byzantine rows; it sees f >= 1.
      min_honest: smallest number of honest rows the attack is defined for.
      stored: the body may take bfloat16 rows (above).

    Returns:
      An Attack.
    """

    def apply(key, honest, params, f):
        f = static_int(f, name, "f")
        honest = jnp.asarray(honest)
        require(honest.ndim == 2, name, "honest of shape (h, d)", ndim=honest.ndim)
        h, d = honest.shape
        require(h >= min_honest, name, f"h >= {min_honest}", h=h, f=f)
        if f == 0:
            return jnp.zeros((0, d), honest.dtype)
        x = kernel_input(honest) if stored else promote(honest)
        out = body(key, x, params, f)
        out = jnp.broadcast_to(out, (f, d)) if out.ndim == 1 else out
        return out.astype(honest.dtype)

    return Attack(default_params, apply)


def sign_flip(variant: str = "mean") -> Attack:
    """Sign flipping: Byzantine workers send negated gradients.

    The gradient-level API only sees the h honest gradients, so the variants are:

    * ``"mean"`` (default): every Byzantine row is ``-ḡ``, ḡ the honest mean
      (ByzFL's `SignFlipping`).
    * ``"own"``: ``u_i = -g_i``, the gradient Byzantine worker i would have sent
      honestly (Allen-Zhu et al.; Karimireddy et al.'s bit flipping; SPEC D14's
      recommended default). The simulator computes those f gradients and passes them
      as ``params["own"]`` of shape (f, d).
    * ``"xie"``: every Byzantine row is ``-params["own"][0]`` (Xie et al.'s code).

    Args:
      variant: ``"mean"``, ``"own"`` or ``"xie"``.

    Returns:
      An Attack; its params are ``{}`` for ``"mean"`` and ``{"own": None}`` otherwise
      (``None`` must be replaced by the (f, d) array before the call).

    Raises:
      ValueError: an unknown variant, or ``params["own"]`` missing or of the wrong
        shape when the attack runs.
    """
    variant = choice(variant, ("mean", "own", "xie"), "sign_flip", "variant")
    if variant == "mean":
        return make_attack(
            "sign_flip", {}, lambda key, x, params, f: -dot_mean(x), stored=True
        )

    def body(key, x, params, f):
        own = params.get("own") if isinstance(params, dict) else None
        if own is None:
            raise ValueError(
                f"sign_flip(variant={variant!r}): pass the Byzantine workers' honest "
                "gradients as params['own'] of shape (f, d)"
            )
        own = jnp.asarray(own)
        require(
            own.shape == (f, x.shape[1]),
            "sign_flip",
            "params['own'] of shape (f, d)",
            f=f,
            d=x.shape[1],
        )
        own = own.astype(x.dtype)
        return -own if variant == "own" else -own[0]

    return make_attack("sign_flip", {"own": None}, body)


def gaussian(sigma: float = 200.0, center: str = "zero") -> Attack:
    """Gaussian noise: ``u_i ~ N(c, sigma^2 I_d)`` independently per Byzantine worker.

    Args:
      sigma: standard deviation (sweepable; 200 in Blanchard et al.'s experiments and
        Xie et al.'s `gaussian_attack`).
      center: ``"zero"`` (c = 0, the papers) or ``"mean"`` (c = ḡ, noise around the
        honest mean).

    Returns:
      An Attack with params ``{"sigma": sigma}``.
    """
    center = choice(center, ("zero", "mean"), "gaussian", "center")

    def body(key, x, params, f):
        noise = jax.random.normal(key, (f, x.shape[1]), x.dtype)
        out = params["sigma"] * noise
        return out + dot_mean(x) if center == "mean" else out

    return make_attack("gaussian", {"sigma": sigma}, body)


def large_opposite(lam: float = 1e10, reduce: str = "sum") -> Attack:
    """Omniscient large opposite vector: ``u = -lam * sum_{i in V} x_i`` (or the mean).

    Breaks the mean; Krum and the median ignore it. In float32, ``lam * ||sum||`` may
    exceed 3.4e38 and overflow to +-Inf, which doubles as a non-finite input test for
    the rules (SPEC D18).

    Args:
      lam: the scale lambda >> 1 (sweepable; 1e10 as in Xie et al.'s
        `omniscient_attack`, which negates the sum of all n submitted vectors where
        this sums the h honest ones).
      reduce: ``"sum"`` (Xie et al.) or ``"mean"`` (``u = -lam * ḡ``, SPEC D7).

    Returns:
      An Attack with params ``{"lam": lam}``.
    """
    reduce = choice(reduce, ("sum", "mean"), "large_opposite", "reduce")

    def body(key, x, params, f):
        scale = params["lam"] * (x.shape[0] if reduce == "sum" else 1)
        return -scale * dot_mean(x)

    return make_attack("large_opposite", {"lam": lam}, body, stored=True)


def _constant(name: str, value: float) -> Callable[[], Attack]:
    def builder() -> Attack:
        return make_attack(
            name, {}, lambda key, x, params, f: jnp.full(x.shape[1], value, x.dtype)
        )

    builder.__name__ = name
    builder.__doc__ = (
        f"Crash fault: every Byzantine row is {value} in every coordinate.\n\n"
        "Returns:\n  An Attack without parameters."
    )
    return builder


nan = _constant("nan", float("nan"))
inf = _constant("inf", float("inf"))
zero = _constant("zero", 0.0)

ATTACKS = {
    "sign_flip": sign_flip,
    "gaussian": gaussian,
    "large_opposite": large_opposite,
    "nan": nan,
    "inf": inf,
    "zero": zero,
}
