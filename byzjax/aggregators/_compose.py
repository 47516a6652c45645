"""Pre-aggregators chained in front of a rule, as one Aggregator.

`chain((nnm(f), bucketing(f, s=2)), krum(f))` hands each stage's output rows to the
next; the downstream rule sees n' = `n_out(n)` rows and checks its own precondition on
(n', f) when traced (Karimireddy et al. build `Krum(n=ceil(n/s), f=f)` after bucketing).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from byzjax._numerics import write_rows
from byzjax.aggregators._base import Aggregator, PreAggregator


def chain(pres: Sequence[PreAggregator], rule: Aggregator) -> Aggregator:
    """Returns the Aggregator that applies `pres` in order, then `rule`.

    Its params are `{"pre": (params of each pre-aggregator,), "rule": rule params}`
    and its state `(tuple of pre-aggregator states, rule state)`. The rule runs its
    `fused_update` where it has one: it reads the last stage's rows inside their
    computation instead of from memory. Between stages the rows stay in
    `compute_dtype` (`wide_update`); the aggregate is returned in the input dtype.
    A rule that reads its rows from memory (`Aggregator.stored`) gets them written
    out once (`write_rows`). A last stage that scales rows (`row_scales`: static
    clipping, ARC) before a rule linear in them (`weighted_update`: the mean)
    hands over its factors instead of the scaled rows.
    """
    pres = tuple(pres)
    if not pres:
        return rule
    scaled = pres[-1].row_scales is not None and rule.weighted_update is not None

    def init(grads):
        states = []
        x = grads
        for pre in pres:
            states.append(pre.init(x))
            x = jnp.zeros((pre.n_out(x.shape[0]), x.shape[1]), x.dtype)
        return tuple(states), rule.init(x)

    def update(grads, state, params):
        pre_states, rule_state = state
        new_states = []
        x = grads
        stages = list(zip(pres, pre_states, params["pre"], strict=True))
        # A stored rule's rows come from the last stage's written form, where it
        # has one.
        written = rule.stored and not scaled and pres[-1].written_update is not None
        for i, (pre, s, p) in enumerate(stages[:-1] if scaled else stages):
            last = i == len(stages) - 1
            form = pre.written_update if written and last else None
            x, s = (form or pre.wide_update or pre.update)(x, s, p)
            new_states.append(s)
        if scaled:
            pre, s, p = stages[-1]
            (factors, keep), s = pre.row_scales(x, s, p)
            new_states.append(s)
            out, rule_state = rule.weighted_update(
                x, factors, keep, rule_state, params["rule"]
            )
        else:
            if rule.stored and not pres[-1].one_array and not written:
                x = write_rows(x)
            out, rule_state = rule.computed_update(x, rule_state, params["rule"])
        return out.astype(grads.dtype), (tuple(new_states), rule_state)

    default_params = {
        "pre": tuple(p.default_params for p in pres),
        "rule": rule.default_params,
    }
    return Aggregator(init, update, default_params)
