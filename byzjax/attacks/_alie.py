"""A Little Is Enough (ALIE): shift every coordinate by z standard deviations.

References:
  Baruch, Baruch, Goldberg. "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", NeurIPS 2019, arXiv:1902.06156 (Algorithm 1, z_max).
  Karimireddy, He, Jaggi. "Learning from History for Byzantine Robust Optimization",
  ICML 2021, arXiv:2012.10333 (their code's z formula (n - f - s) / (n - f)).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import jax

from byzjax._checks import require, static_int
from byzjax._numerics import mean_std
from byzjax.attacks._base import Attack
from byzjax.attacks._simple import choice, make_attack

Z_FORMS = ("paper", "karimireddy")


def z_max(n: int, f: int, form: str = "paper") -> float:
    """The largest z for which ALIE's shifted vector still gathers a majority.

    ``s = floor(n/2 + 1) - f`` honest supporters are needed for a majority, and
    ``z_max = Phi^-1((n - s) / n)`` (``form="paper"``, ALIE Algorithm 1) or
    ``Phi^-1((n - f - s) / (n - f))`` (``form="karimireddy"``, the formula of
    Karimireddy et al.'s and Blades' code). When ``s <= 0`` (f >= floor(n/2 + 1)) the
    probability is >= 1 and z_max is +inf; a probability <= 0 gives -inf.

    Args:
      n: total number of workers (static Python int >= 1).
      f: number of Byzantine workers, 0 <= f < n.
      form: ``"paper"`` or ``"karimireddy"``.

    Returns:
      z_max as a Python float.

    Raises:
      ValueError: non-integer counts, f >= n, or an unknown form.
    """
    n = static_int(n, "alie", "n", minimum=1)
    f = static_int(f, "alie", "f")
    require(f < n, "alie", "f < n", n=n, f=f)
    form = choice(form, Z_FORMS, "alie", "form")
    s = n // 2 + 1 - f
    if s <= 0:
        return math.inf
    p = (n - s) / n if form == "paper" else (n - f - s) / (n - f)
    if p >= 1.0:
        return math.inf
    if p <= 0.0:
        return -math.inf
    return NormalDist().inv_cdf(p)


def alie_vector(x: jax.Array, z, ddof: int) -> jax.Array:
    """``mu - z * sigma`` over the rows of x (the shared ALIE vector)."""
    mu, sigma = mean_std(x, ddof)
    return mu - z * sigma


def alie(z: float | None = None, form: str = "paper", ddof: int = 0) -> Attack:
    """ALIE: every Byzantine worker sends ``u = mu - z * sigma`` (coordinate-wise).

    ``mu`` and ``sigma`` are the mean and standard deviation of each coordinate over
    the honest gradients (the omniscient reference set of Karimireddy et al., ByzFL,
    Blades). For the non-omniscient variant of the ALIE authors' code, in which the
    Byzantine workers use the gradients they computed honestly on their own data, the
    caller passes those gradients as `honest`.

    Decisions (SPEC D6): the sign is ``mu - z sigma`` (ByzFL, Blades and Shejwalkar
    use ``mu + z sigma``: pass a negative z for it); ``ddof = 0`` as in the ALIE
    code's ``np.var`` (Karimireddy et al.'s ``torch.std`` is ``ddof = 1``); all f
    workers send the same vector.

    Args:
      z: the shift in standard deviations (sweepable). ``None`` uses
        ``z_max(h + f, f, form)`` computed when the attack is traced.
      form: the z_max formula when z is None: ``"paper"`` or ``"karimireddy"``.
      ddof: delta degrees of freedom of sigma, 0 or 1.

    Returns:
      An Attack with params ``{"z": z}``.

    Raises:
      ValueError: an unknown form, ddof not in {0, 1}, or h <= ddof.
    """
    form = choice(form, Z_FORMS, "alie", "form")
    ddof = static_int(ddof, "alie", "ddof")
    require(ddof <= 1, "alie", "ddof in {0, 1}", ddof=ddof)

    def body(key, x, params, f):
        z_ = params["z"]
        if z_ is None:
            z_ = z_max(x.shape[0] + f, f, form)
        return alie_vector(x, z_, ddof)

    return make_attack("alie", {"z": z}, body, min_honest=ddof + 1, stored=True)


ATTACKS = {"alie": alie}
