"""Inner product manipulation (IPM): send a scaled negative of the honest mean.

References:
  Xie, Koyejo, Gupta. "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
  Product Manipulation", UAI 2019, arXiv:1903.03936.
"""

from __future__ import annotations

from byzjax._numerics import dot_mean
from byzjax.attacks._base import Attack
from byzjax.attacks._simple import make_attack


def ipm(eps: float = 0.1) -> Attack:
    """IPM: every Byzantine worker sends ``u = -eps * ḡ``, ḡ the honest mean.

    A small eps keeps u close to the honest cluster so that f identical copies win
    Krum's score; a large eps drags the coordinate-wise median across zero where the
    honest coordinates straddle 0. Either way the goal is ``<ḡ, Aggr> < 0``. The
    parametrisation is FoE's (SPEC D7); ByzFL's ``FallOfEmpires(tau)`` is
    ``eps = tau - 1``.

    Args:
      eps: the scale (sweepable); 0.1 as in Karimireddy et al.'s code. eps < 0 sends
        a scaled honest mean, which is not an attack.

    Returns:
      An Attack with params ``{"eps": eps}``.
    """
    return make_attack(
        "ipm",
        {"eps": eps},
        lambda key, x, params, f: -params["eps"] * dot_mean(x),
        stored=True,
    )


ATTACKS = {"ipm": ipm}
