"""The hand-checked examples of shared/SPEC.md (sections 1, 4 and Appendix A).

Every rule and pre-aggregator is run on the running example X7 (n = 7, d = 2, f = 1,
last row Byzantine), plus the Bulyan 1-D example, the two Fall of Empires toys and the
tie-break vectors. Values are the SPEC's verified numbers, or derived by hand in a
comment where the SPEC gives none; the oracle is cross-checked on the same inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import byzjax
from byzjax import aggregators
from byzjax.aggregators._bulyan import bulyan_selection
from byzjax.aggregators._krum import krum_scores
from byzjax.aggregators._preagg import arc_count

X7 = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 1], [1, 2], [9, 9]], np.float32)
BULYAN_1D = np.array([3, 8, 14, 15, 24, 27, 100], np.float32)[:, None]
FOE_MEDIAN = np.array([-0.1, 0.1, 0.3, -4, -2], np.float32)[:, None]
FOE_KRUM = np.array([0, 0.02, 0.14, 0.26, 0.38, 0.5, -0.1, -0.1, -0.1], np.float32)
FOE_KRUM = FOE_KRUM[:, None]
GM_EXACT = {"init": "mean", "nu": 1e-6, "relative_nu": False, "iterations": 100}
GM_ONE_STEP = {"init": "mean", "nu": 1e-6, "relative_nu": False, "iterations": 1}

X7_EXAMPLES = [
    ("mean", {}, (2, 2)),
    ("median", {}, (1, 1)),
    ("trimmed_mean", {}, (1, 1)),
    # Medians (1, 1); deviations of column 0: 1,0,1,0,1,0,8 -> the six smallest drop
    # the 9: (0+1+0+1+2+1)/6; column 1 is symmetric.
    ("mean_around_median", {}, (5 / 6, 5 / 6)),
    # ALIE keeps n - f - 1 = 5: dev ties at 1 go to the lower index, dropping x4.
    ("mean_around_median", {"variant": "alie"}, (3 / 5, 3 / 5)),
    ("krum", {}, (1, 1)),
    ("multi_krum", {"m": 6}, (5 / 6, 5 / 6)),
    ("multi_krum", {"m": 4}, (0.5, 0.5)),  # three-way tie at 9 -> T0 picks x0
    # S = {3, 1, 2, 4, 0} (hand-run in test_bulyan_x7_selection); column 0 values
    # 0,1,0,1,2 around 1: x1, x3 then x0 (T0) -> 2/3; column 1: 0,0,1,1,1 -> 1.
    ("bulyan", {}, (2 / 3, 1)),
    ("geometric_median", GM_EXACT, (1, 1)),
    ("geometric_median", {"preset": "byzfl"}, (0.847871, 0.847871)),
    ("geometric_median", GM_ONE_STEP, (1.248355, 1.248355)),
    ("geometric_median", {}, (1, 1)),
    ("centered_clipping", {"tau": 1.0}, (0.536551, 0.536551)),
    ("centered_clipping", {"tau": 1.0, "iterations": 3}, (0.905286, 0.905286)),
    ("mda", {}, (5 / 6, 5 / 6)),
    # Every coordinate of x1..x6 is >= 0 with at least four positives; x0 abstains.
    ("sign_majority", {}, (1, 1)),
]


def _pre(name, f, **params):
    """The jitted x -> pre-aggregated rows, with the initial state and params."""
    pre = aggregators.get_pre(name)(f, **params)
    return jax.jit(lambda x: pre.update(x, pre.init(x), pre.default_params)[0])


def _oracle_kwargs(name, params):
    if params.get("preset") == "byzfl":
        return {"init": "zero", "nu": 0.1, "relative_nu": False, "iterations": 3}
    return params


@pytest.mark.parametrize("name,params,expect", X7_EXAMPLES, ids=str)
def test_x7_every_rule(name, params, expect):
    out = byzjax.aggregate(name, X7, f=1, **params)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    oracle = reference.RULES[name](X7, 1, **_oracle_kwargs(name, params))
    np.testing.assert_allclose(oracle, expect, rtol=1e-5, atol=1e-5)


def test_every_rule_has_an_x7_example():
    assert {name for name, _, _ in X7_EXAMPLES} == set(aggregators.names())


def test_x7_krum_scores_and_order():
    scores = jax.jit(krum_scores, static_argnums=(1, 2))(jnp.asarray(X7), 4, 1)
    np.testing.assert_allclose(scores, [9, 6, 6, 4, 9, 9, 499], rtol=1e-6)
    order = reference.order_by(np.asarray(scores))
    np.testing.assert_array_equal(order, [3, 1, 2, 0, 4, 5, 6])


def test_x7_nnm():
    y = np.asarray(_pre("nnm", 1)(X7))
    np.testing.assert_allclose(y[:6], np.full((6, 2), 5 / 6), rtol=1e-6)
    np.testing.assert_allclose(y[6], (14 / 6, 14 / 6), rtol=1e-6)
    np.testing.assert_allclose(y, reference.nnm(X7, 1), rtol=1e-6)
    mean = byzjax.aggregate("mean", X7, f=1, pre=["nnm"])
    np.testing.assert_allclose(mean, (1.047619, 1.047619), rtol=1e-5)
    med = byzjax.aggregate("median", X7, f=1, pre=["nnm"])
    np.testing.assert_allclose(med, (5 / 6, 5 / 6), rtol=1e-5)


def test_x7_bucketing_identity_permutation():
    pre = aggregators.get_pre("bucketing")(1, s=2, shuffle=False)
    y = _pre("bucketing", 1, s=2, shuffle=False)(X7)
    expect = [(0.5, 0), (0.5, 1), (1.5, 1.5), (9, 9)]  # the last bucket is x6 alone
    np.testing.assert_allclose(y, expect)
    np.testing.assert_allclose(reference.bucketing(X7, 1, s=2), expect)
    assert pre.n_out(7) == 4


def test_x7_arc():
    assert arc_count(7, 1) == 1 and arc_count(25, 6) == 9
    y = np.asarray(_pre("arc", 1)(X7))
    np.testing.assert_allclose(y[6], (1.581139, 1.581139), rtol=1e-6)
    np.testing.assert_array_equal(y[:6], X7[:6])
    np.testing.assert_allclose(np.linalg.norm(y[6]), np.sqrt(5), rtol=1e-6)
    out = byzjax.aggregate("mean", X7, f=1, pre=["arc"])
    np.testing.assert_allclose(out, (0.940163, 0.940163), rtol=1e-5)
    np.testing.assert_allclose(reference.arc(X7, 1), y, rtol=1e-6)


def test_x7_static_clipping():
    y = np.asarray(_pre("clipping", 1, tau=1.0)(X7))
    # Rows of norm <= 1 (x0, x1, x2) are unchanged; the others land on the sphere.
    np.testing.assert_array_equal(y[:3], X7[:3])
    np.testing.assert_allclose(np.linalg.norm(y[3:], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[6], (2**-0.5, 2**-0.5), rtol=1e-6)


def test_bulyan_1d_example():
    out = byzjax.aggregate("bulyan", BULYAN_1D, f=1)
    np.testing.assert_allclose(out, [12.333333], rtol=1e-6)
    picked = jax.jit(bulyan_selection, static_argnums=(1, 2))(BULYAN_1D, 1, 5)
    # t0 k=4 -> 14; t1 k=3 -> 15; t2 k=2 -> 24; t3 k=1 tie 3/8 -> 3; t4 tie 8/27 -> 8.
    np.testing.assert_array_equal(BULYAN_1D[np.asarray(picked), 0], [14, 15, 24, 3, 8])
    assert reference.bulyan_selection(BULYAN_1D, 1) == [2, 3, 4, 0, 1]
    np.testing.assert_allclose(reference.bulyan(BULYAN_1D, 1), [12.333333], rtol=1e-6)
    scores0 = jax.jit(krum_scores, static_argnums=(1, 2))(BULYAN_1D, 4, 1)
    np.testing.assert_allclose(scores0, [731, 366, 258, 275, 446, 683, 25726])
    # The comparison line of SPEC 1.6.
    for name, expect in [("mean", 27.285714), ("median", 15), ("trimmed_mean", 17.6)]:
        out = byzjax.aggregate(name, BULYAN_1D, f=1)
        np.testing.assert_allclose(out, [expect], rtol=1e-6)


def test_bulyan_x7_selection():
    picked = jax.jit(bulyan_selection, static_argnums=(1, 2))(X7, 1, 5)
    # t0 k=4: x3 (score 4); t1 k=3: x1/x2 tie at 5 -> x1; t2 k=2: x2 (3); t3 k=1:
    # x4/x5 tie at 2 -> x4; t4 k=1: x0/x5 tie at 5 -> x0.
    np.testing.assert_array_equal(picked, [3, 1, 2, 4, 0])
    assert reference.bulyan_selection(X7, 1) == [3, 1, 2, 4, 0]


def test_fall_of_empires_median_toy():
    honest_mean = 0.1
    out = byzjax.aggregate("median", FOE_MEDIAN, f=2)
    np.testing.assert_allclose(out, [-0.1], rtol=1e-6)
    assert honest_mean * float(out[0]) == pytest.approx(-0.01, rel=1e-5)
    np.testing.assert_allclose(
        byzjax.aggregate("trimmed_mean", FOE_MEDIAN, f=2), [-0.1], rtol=1e-6
    )
    np.testing.assert_allclose(byzjax.aggregate("mean", FOE_MEDIAN, f=2), [-1.14])
    with pytest.raises(ValueError, match=r"krum: requires n >= 2f \+ 3, got n=5, f=2"):
        byzjax.aggregate("krum", FOE_MEDIAN, f=2)


def test_fall_of_empires_krum_toy():
    scores = jax.jit(krum_scores, static_argnums=(1, 2))(FOE_KRUM, 4, 3)
    expect = [0.0304, 0.0436, 0.1060, 0.1440, 0.2160, 0.4320, 0.0244, 0.0244, 0.0244]
    np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reference.krum_scores(FOE_KRUM, 3), expect, rtol=1e-4)
    np.testing.assert_allclose(
        byzjax.aggregate("krum", FOE_KRUM, f=3), [-0.1], rtol=1e-6
    )
    ip = 0.216667 * float(byzjax.aggregate("krum", FOE_KRUM, f=3)[0])
    assert ip == pytest.approx(-0.021667, rel=1e-4)
    # ByzFL's n - f - 1 neighbours pick the honest 0 (SPEC 4.2 table).
    np.testing.assert_allclose(
        byzjax.aggregate("krum", FOE_KRUM, f=3, variant="byzfl"), [0.0], atol=1e-7
    )
    byzfl_scores = jax.jit(krum_scores, static_argnums=(1, 2))(FOE_KRUM, 5, 3)
    np.testing.assert_allclose(
        np.asarray(byzfl_scores)[[6, 0, 1]], [0.082, 0.050, 0.058], rtol=1e-4
    )
    for name, params, expect in [
        ("multi_krum", {"m": 4}, -0.075),
        ("multi_krum", {"m": 6}, -0.023333),
        ("median", {}, 0.02),
        ("trimmed_mean", {}, 0.053333),
        ("mean", {}, 0.111111),
    ]:
        out = byzjax.aggregate(name, FOE_KRUM, f=3, **params)
        np.testing.assert_allclose(out, [expect], rtol=1e-4, err_msg=name)


def test_krum_neighbour_count_sweep_on_foe_toy():
    # SPEC 4.2: only k <= n - f - 2 = 4 selects -0.1; k = 5 selects the honest 0.
    for k, expect in [(1, -0.1), (2, -0.1), (3, -0.1), (4, -0.1), (5, 0.0)]:
        out = byzjax.aggregate("krum", FOE_KRUM, f=3, neighbors=k)
        np.testing.assert_allclose(out, [expect], atol=1e-7, err_msg=str(k))


def test_median_even_count_convention():
    # {1, 2, 3, 10}: average of the middles (numpy, SPEC D4), not 2 (torch) or 3.
    x = np.array([1, 2, 3, 10], np.float32)[:, None]
    np.testing.assert_allclose(byzjax.aggregate("median", x, f=1), [2.5])
    np.testing.assert_allclose(reference.median(x), [2.5])


def test_sign_vote_example_and_zero_convention():
    g = np.array([[1, -2, 0.5], [2, 1, -0.1], [-3, -1, 0.2], [0.5, 0, -1]], np.float32)
    np.testing.assert_array_equal(byzjax.aggregate("sign_majority", g, f=1), [1, -1, 0])
    # zero_sign=1 (x >= 0 -> +1): worker 3 votes +1 on coordinate 1 -> sum 0 -> +1,
    # and the tied coordinate 2 becomes +1.
    out = byzjax.aggregate("sign_majority", g, f=1, zero_sign=1)
    np.testing.assert_array_equal(out, [1, 1, 1])
    np.testing.assert_array_equal(reference.sign_majority(g, 1, zero_sign=1), out)


def test_mda_x7_subset_and_tie_order():
    np.testing.assert_allclose(byzjax.aggregate("mda", X7, f=1), (5 / 6, 5 / 6))
    # Two equal-diameter subsets: {0, 1} and {1, 2} (diameter 1); the first in
    # lexicographic order wins -> mean(x0, x1).
    x = np.array([[0.0], [1.0], [2.0]], np.float32)
    np.testing.assert_allclose(byzjax.aggregate("mda", x, f=1), [0.5])
    np.testing.assert_allclose(reference.mda(x, 1), [0.5])


def test_tie_break_goes_to_lowest_index():
    # Mean around the median of {0, 2, 1} keeping 2: the median 1 itself, then 0 and
    # 2 tie at deviation 1 and T0 takes worker 0 -> 0.5 (the higher index gives 1.5).
    x = np.array([[0.0], [2.0], [1.0]], np.float32)
    np.testing.assert_allclose(
        byzjax.aggregate("mean_around_median", x, f=1, keep=2), [0.5]
    )
    np.testing.assert_allclose(reference.mean_around_median(x, 1, keep=2), [0.5])
    np.testing.assert_allclose(
        byzjax.aggregate("mean_around_median", x[::-1].copy(), f=1, keep=2), [1.5]
    )
    # Multi-Krum: rows 0 and 2 are identical, so their scores tie exactly.
    x = np.array([[0, 0], [5, 5], [0, 0], [1, 0], [0, 1], [9, 9], [-7, 3]], np.float32)
    out = byzjax.aggregate("multi_krum", x, f=1, m=3)
    np.testing.assert_allclose(out, reference.multi_krum(x, 1, m=3), rtol=1e-6)
