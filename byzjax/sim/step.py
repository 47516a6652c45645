"""One Byzantine SGD step as one XLA program.

A step, with no host callback inside:

1. Placement: which of the n workers are Byzantine this step. ``"fixed"``: workers
   0..f-1, whose rows come first (the convention of the ALIE, Xie and Shejwalkar
   reference codes, SPEC D17); ``"random"``: a permutation drawn from the PRNG every
   step (FoE's threat model lets the Byzantine set change).
2. Workers: each draws a minibatch on device and computes its gradient, one `vmap`.
   Only the h honest workers are computed for omniscient gradient attacks; all n
   when the Byzantine workers need their own honest gradients (``attack="none"``,
   data poisoning, sign flipping of one's own gradient). Poisoned batches are
   changed inside the same vmap with a per-worker mask.
3. Optional worker momentum ``m_i <- beta m_i + (1 - beta) g_i``; workers send m_i.
4. The attack turns the honest rows (h, d) into the f Byzantine rows; the n rows are
   interleaved per the placement and handed to the rule (with its pre-aggregators
   and state).
5. The server applies an optax transformation to the aggregate and steps by ``-lr``.
6. Diagnostics (see `byzjax.sim.diagnostics`) are returned as scalars.

Everything a sweep varies (learning rate, momentum, attack and rule
hyperparameters, ALIE's z of the predictor, the index of a switched attack) travels
in the `hparams` pytree of float arrays, so `jax.vmap` over states (seeds) and
hparams turns a sweep into one compiled program. Counts (n, f, batch size) and
shapes are static.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from byzjax import aggregators, attacks, models
from byzjax._numerics import row_mean
from byzjax.attacks import StatefulAttack
from byzjax.sim import diagnostics
from byzjax.sim.config import Config, ConfigError
from byzjax.sim.worker import WorkerData, flat_model, sample_batches, worker_grads

__all__ = ["AttackSpec", "Simulator", "TrainState", "build", "resolve_attack"]


class TrainState(NamedTuple):
    """Everything that changes from step to step (donated between chunks).

    Attributes:
      step: int32 step count.
      key: the PRNG key of the next step.
      theta: (d,) flat model parameters.
      opt_state: the server optimizer's state.
      agg_state: the aggregation rule's state (empty for stateless rules).
      attack_state: a stateful attack's state (empty otherwise).
      momenta: (n, d) worker momenta, by worker id ((0, d) when momentum is off).
    """

    step: jax.Array
    key: jax.Array
    theta: jax.Array
    opt_state: Any
    agg_state: Any
    attack_state: Any
    momenta: jax.Array


class AttackSpec(NamedTuple):
    """A resolved attack.

    Attributes:
      name: registry name (or "none").
      kind: "none", "gradient", "stateful" or "poisoning".
      impl: the Attack, StatefulAttack or Poisoning (None for "none").
      params: its parameters (builder defaults).
      z: the z of ALIE's predictor: the attack's own z for ALIE, else None.
    """

    name: str
    kind: str
    impl: Any
    params: Any
    z: float | None


def resolve_attack(name: str, params: dict | None = None) -> AttackSpec:
    """Builds attack `name` (gradient, stateful or data poisoning) from the registries.

    Raises:
      ValueError: an unknown name or parameter.
    """
    params = dict(params or {})
    if name == "none":
        if params:
            raise ValueError(f"attack 'none' takes no parameters, got {sorted(params)}")
        return AttackSpec("none", "none", None, {}, None)
    if name in attacks.poisoning_names():
        impl = attacks.build_poisoning(name, **params)
        return AttackSpec(name, "poisoning", impl, impl.default_params, None)
    if name not in attacks.names():
        valid = ", ".join(("none", *attacks.names(), *attacks.poisoning_names()))
        raise ValueError(f"unknown attack {name!r}; valid names: {valid}")
    impl = attacks.build(name, **params)
    kind = "stateful" if isinstance(impl, StatefulAttack) else "gradient"
    z = None
    if name == "alie" and isinstance(impl.default_params, dict):
        z = impl.default_params.get("z")
    return AttackSpec(name, kind, impl, impl.default_params, z)


def _needs_own(spec: AttackSpec) -> bool:
    """Whether the Byzantine workers' own honest gradients must be computed."""
    if spec.kind in ("none", "poisoning"):
        return True
    return isinstance(spec.params, dict) and "own" in spec.params


class _Split(NamedTuple):
    """A params pytree split into float leaves (swept, traced) and the rest (static)."""

    dynamic: list
    rebuild: Callable[[list], Any]


def _split_params(tree) -> _Split:
    """Float leaves become float32 arrays in `dynamic`; ints, bools, strings stay.

    Rules and attacks may use integer parameters as static counts, so only floats
    (the hyperparameters people sweep) are passed as traced arguments.
    """
    leaves, treedef = jax.tree.flatten(tree)

    def is_float(leaf):
        if isinstance(leaf, bool):
            return False
        if isinstance(leaf, float):
            return True
        return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)

    mask = [is_float(leaf) for leaf in leaves]
    dynamic = [
        jnp.asarray(leaf, jnp.float32)
        for leaf, m in zip(leaves, mask, strict=True)
        if m
    ]

    def rebuild(values):
        it = iter(values)
        merged = [next(it) if m else leaf for leaf, m in zip(leaves, mask, strict=True)]
        return jax.tree.unflatten(treedef, merged)

    return _Split(dynamic, rebuild)


def _server_transform(name: str, hp: dict) -> optax.GradientTransformation:
    """The server's direction (before -lr), built from traced hyperparameters."""
    if name == "sgd":
        return optax.identity()
    if name == "momentum":
        return optax.trace(decay=hp["server_momentum"])
    if name == "adam":
        return optax.scale_by_adam()
    raise ConfigError("optimizer", f"unknown optimizer {name!r}")


class ModelFns(NamedTuple):
    """A model's pure functions on flat parameter vectors (cached per model).

    Attributes:
      d: number of parameters.
      unravel: flat (d,) vector -> parameter pytree.
      flat_loss: ``flat_loss(theta, x, y)``, the mean cross-entropy of one batch.
      init_theta: jitted ``init_theta(key) -> theta (d,)``.
      evaluate: ``evaluate(theta, x, y) -> (loss, accuracy)`` over a test set, in
        batches of 1000 (`lax.map`), so large test sets fit in memory.
    """

    d: int
    unravel: Callable
    flat_loss: Callable
    init_theta: Callable
    evaluate: Callable


@functools.lru_cache(maxsize=32)
def model_fns(name: str, num_classes: int, feature_shape: tuple) -> ModelFns:
    """The `ModelFns` of model `name` for data of `feature_shape`.

    Cached, so runs that share a model share the compiled initializer and
    evaluation (seconds of XLA:CPU compilation each otherwise).
    """
    module = models.build(name, num_classes)
    loss = models.loss_fn(module)
    params_shape = jax.eval_shape(
        lambda k: models.init(module, k, feature_shape), jax.random.key(0)
    )
    # ravel_pytree's unravel depends only on shapes and dtypes
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params_shape)
    _, unravel, flat_loss = flat_model(loss, zeros)

    @jax.jit
    def init_theta(key):
        return flat_model(loss, models.init(module, key, feature_shape))[0]

    def evaluate(theta, x, y, batch_size: int = 1000):
        total = x.shape[0]
        batch_size = min(batch_size, total)
        nb = -(-total // batch_size)
        pad = nb * batch_size - total
        xp = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        yp = jnp.pad(y, (0, pad))
        valid = jnp.arange(nb * batch_size) < total
        shape = (nb, batch_size)
        params = unravel(theta)

        def one(args):
            xi, yi, vi = args
            logits = module.apply({"params": params}, xi)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yi)
            hit = jnp.argmax(logits, -1) == yi
            return jnp.sum(jnp.where(vi, ce, 0.0)), jnp.sum(hit & vi)

        ce, hits = lax.map(
            one,
            (
                xp.reshape(shape + x.shape[1:]),
                yp.reshape(shape),
                valid.reshape(shape),
            ),
        )
        return jnp.sum(ce) / total, jnp.sum(hits).astype(jnp.float32) / total

    return ModelFns(
        models.param_count(params_shape), unravel, flat_loss, init_theta, evaluate
    )


class Simulator(NamedTuple):
    """The compiled-program building blocks of one simulated setting.

    All functions are pure; `step` and `inspect` take the hparams pytree explicitly
    so they can be vmapped over seeds (stacked states) and hyperparameters.

    Attributes:
      init: ``init(key) -> TrainState``.
      step: ``step(state, hparams, data) -> (state, metrics)``; metrics is a dict
        of float32 scalars (`diagnostics.METRICS`).
      inspect: ``inspect(state, hparams, data) -> dict`` of the step's
        intermediates (batches, honest rows, Byzantine rows, the rows handed to
        the rule, the Byzantine mask, the aggregate, metrics), for tests and
        debugging; the same code path as `step`.
      evaluate: ``evaluate(theta, x, y) -> (loss, accuracy)`` on a test set.
      hparams: the default hparams pytree (float32 arrays).
      n: number of workers.
      f: number of Byzantine workers.
      d: model dimension.
      unravel: maps a flat (d,) vector to the model's parameter pytree.
      traces: ``traces() -> int``, how many times `step`'s body was traced.
    """

    init: Callable
    step: Callable
    inspect: Callable
    evaluate: Callable
    hparams: dict
    n: int
    f: int
    d: int
    unravel: Callable
    traces: Callable[[], int]


def _placement(key, n: int, f: int, random: bool):
    """``(order, inverse, byz_mask)``: worker ids Byzantine-first, and row layout."""
    if random and f > 0:
        order = jax.random.permutation(key, n).astype(jnp.int32)
        inverse = jnp.argsort(order).astype(jnp.int32)
        byz_mask = inverse < f
    else:
        order = jnp.arange(n, dtype=jnp.int32)
        inverse = order
        byz_mask = order < f
    return order, inverse, byz_mask


def build(
    config: Config,
    *,
    num_classes: int,
    feature_shape: Sequence[int],
    attacks_: Sequence[tuple[str, dict]] | None = None,
) -> Simulator:
    """Builds the step of `config` for data of `feature_shape` and `num_classes`.

    Args:
      config: the run configuration.
      num_classes: number of classes of the data set.
      feature_shape: shape of one example.
      attacks_: optional list of ``(name, params)`` gradient attacks (or "none")
        selected at run time by ``hparams["attack_index"]``: the runs of a sweep
        over attacks then share one compiled step (under `vmap` every branch is
        computed, which is cheap next to the gradients). Overrides
        ``config.attack``.

    Returns:
      The Simulator.

    Raises:
      ValueError: an unknown name or parameter, or a violated precondition of the
        rule or attack (raised while tracing, before any compilation).
    """
    n, f, batch = config.workers, config.byzantine, config.batch_size
    h = n - f
    fns = model_fns(config.model, num_classes, tuple(feature_shape))
    d, unravel, flat_loss = fns.d, fns.unravel, fns.flat_loss

    agg = aggregators.build(
        config.aggregator,
        f=config.rule_f(),
        pre=[(p, config.pre_params.get(p, {})) for p in config.pre],
        **config.aggregator_params,
    )
    # The rows are computed in the step (honest gradients and attack rows stacked,
    # then placed): the rule's form for computed rows reads them in that fused
    # computation rather than from a written-out copy.
    agg_update = agg.computed_update
    if attacks_ is None:
        specs = [resolve_attack(config.attack, config.attack_params)]
        switched = False
    else:
        specs = [resolve_attack(name, p) for name, p in attacks_]
        bad = [s.name for s in specs if s.kind not in ("none", "gradient")]
        if bad:
            raise ValueError(f"only gradient attacks can be switched, got {bad}")
        switched = True
    needs_own = any(_needs_own(s) for s in specs) or f == 0
    poisoning = specs[0] if specs[0].kind == "poisoning" else None
    stateful = specs[0] if specs[0].kind == "stateful" else None

    atk_splits = [_split_params(s.params) for s in specs]
    agg_split = _split_params(agg.default_params)
    z_default = [attacks.z_max(n, f) if s.z is None else s.z for s in specs]
    z_default = [z if math.isfinite(z) else math.copysign(1e30, z) for z in z_default]
    hparams = {
        "lr": jnp.float32(config.lr),
        "momentum": jnp.float32(config.momentum),
        "server_momentum": jnp.float32(config.server_momentum),
        "aggregator": agg_split.dynamic,
        "attack": [sp.dynamic for sp in atk_splits],
        "z": jnp.asarray(z_default, jnp.float32),
        "attack_index": jnp.int32(0),
    }
    use_momentum = config.momentum > 0
    random_placement = config.placement == "random"
    influence = config.influence
    if influence is None:
        # Selection rules are where "how many chosen rows were Byzantine" means
        # something; the VJP through a sorting network (median) tripled its compile
        # time and cost 90 % of the step, so other rules opt in.
        influence = config.aggregator in SELECTION_RULES
    influence = influence and _influence_traces(agg, agg_update, n, d, agg_split)
    trace_count = [0]

    def init(key) -> TrainState:
        k_model, k_run = jax.random.split(key)
        theta = fns.init_theta(k_model)
        x0 = jnp.zeros((n, d), theta.dtype)
        opt = _server_transform(config.optimizer, hparams)
        atk_state = (
            stateful.impl.init(jnp.zeros((h, d), theta.dtype)) if stateful else ()
        )
        return TrainState(
            step=jnp.int32(0),
            key=k_run,
            theta=theta,
            opt_state=opt.init(theta),
            agg_state=agg.init(x0),
            attack_state=atk_state,
            momenta=jnp.zeros((n if use_momentum else 0, d), theta.dtype),
        )

    def attack_rows(spec, split, dyn, key, honest, own, atk_state):
        if spec.kind in ("none", "poisoning"):
            return own, atk_state
        params = split.rebuild(dyn)
        if isinstance(params, dict) and "own" in params:
            params = {**params, "own": own}
        if spec.kind == "stateful":
            return spec.impl.apply(key, honest, atk_state, params, f)
        return spec.impl.apply(key, honest, params, f), atk_state

    def forward(state: TrainState, hp: dict, data: WorkerData):
        trace_count[0] += 1
        key, k_place, k_batch, k_atk, k_poison = jax.random.split(state.key, 5)
        order, inverse, byz_mask = _placement(k_place, n, f, random_placement)
        ids = order if needs_own else order[f:]
        xb, yb = sample_batches(k_batch, data, ids, batch)
        if poisoning is not None:
            poisoned = jnp.arange(ids.shape[0]) < f
            xb, yb = attacks.poison_workers(
                poisoning.impl,
                k_poison,
                xb,
                yb,
                poisoned,
                atk_splits[0].rebuild(hp["attack"][0]),
                num_classes,
            )
        losses, grads = worker_grads(flat_loss, state.theta, xb, yb)
        momenta = state.momenta
        if use_momentum:
            beta = hp["momentum"].astype(grads.dtype)
            grads = beta * momenta[ids] + (1 - beta) * grads
            momenta = momenta.at[ids].set(grads)
        honest = grads[f:] if needs_own else grads
        own = grads[:f] if needs_own else None
        honest_loss = jnp.mean(losses[f:] if needs_own else losses)

        atk_state = state.attack_state
        if switched:

            def branch(i):
                def rows_of(dyns):
                    spec, split = specs[i], atk_splits[i]
                    return attack_rows(spec, split, dyns[i], k_atk, honest, own, ())[0]

                return rows_of

            byz = lax.switch(
                hp["attack_index"], [branch(i) for i in range(len(specs))], hp["attack"]
            )
        else:
            byz, atk_state = attack_rows(
                specs[0], atk_splits[0], hp["attack"][0], k_atk, honest, own, atk_state
            )
        byz = byz.astype(honest.dtype)
        stacked = jnp.concatenate([byz, honest], axis=0)
        rows = stacked[inverse] if random_placement and f > 0 else stacked

        agg_params = agg_split.rebuild(hp["aggregator"])
        if influence:
            aggregate, agg_state, weights = diagnostics.aggregate_with_influence(
                agg_update, rows, state.agg_state, agg_params
            )
            infl = diagnostics.influence_metrics(weights, byz_mask)
        else:
            aggregate, agg_state = agg_update(rows, state.agg_state, agg_params)
            nan = jnp.float32(jnp.nan)
            infl = {"byz_weight": nan, "byz_selected": nan, "n_selected": nan}

        opt = _server_transform(config.optimizer, hp)
        direction, opt_state = opt.update(aggregate, state.opt_state, state.theta)
        theta = state.theta - hp["lr"].astype(state.theta.dtype) * direction

        g = row_mean(honest)
        z = hp["z"][hp["attack_index"]] if switched else hp["z"][0]
        metrics = {
            "loss": honest_loss.astype(jnp.float32),
            **diagnostics.inner_product_metrics(g, aggregate),
            "alie_frac": diagnostics.alie_fraction(honest, z),
            **infl,
            "finite": jnp.all(jnp.isfinite(aggregate)).astype(jnp.float32),
        }
        metrics = {k: metrics[k] for k in diagnostics.METRICS}
        new_state = TrainState(
            step=state.step + 1,
            key=key,
            theta=theta,
            opt_state=opt_state,
            agg_state=agg_state,
            attack_state=atk_state,
            momenta=momenta,
        )
        aux = {
            "worker_ids": ids,
            "x": xb,
            "y": yb,
            "honest": honest,
            "byzantine": byz,
            "rows": rows,
            "byz_mask": byz_mask,
            "aggregate": aggregate,
            "honest_mean": g,
            "metrics": metrics,
        }
        return new_state, metrics, aux

    def step(state, hp, data):
        new_state, metrics, _ = forward(state, hp, data)
        return new_state, metrics

    def inspect(state, hp, data):
        return forward(state, hp, data)[2]

    return Simulator(
        init=init,
        step=step,
        inspect=inspect,
        evaluate=fns.evaluate,
        hparams=hparams,
        n=n,
        f=f,
        d=d,
        unravel=unravel,
        traces=lambda: trace_count[0],
    )


SELECTION_RULES = ("krum", "multi_krum", "bulyan", "mda")


def _influence_traces(
    agg: aggregators.Aggregator, update, n: int, d: int, split
) -> bool:
    """Whether `update` (agg's, for the step's rows) can be differentiated (reverse
    mode) for the influence."""
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    try:
        jax.eval_shape(
            lambda x: diagnostics.aggregate_with_influence(
                update, x, agg.init(x), split.rebuild(split.dynamic)
            ),
            x,
        )
    except Exception:  # noqa: BLE001 - e.g. a while_loop has no reverse mode
        return False
    return True


def check_rule(agg, n: int, d: int) -> None:
    """Traces `agg.update` on (n, d) shapes, raising its precondition ValueError."""
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    jax.eval_shape(lambda x: agg.update(x, agg.init(x), agg.default_params)[0], x)


def check_attack(spec: AttackSpec, n: int, f: int, d: int, feature_shape, classes):
    """Traces the attack on (h, d) honest shapes, raising its ValueError."""
    if spec.kind in ("none",) or f == 0:
        return
    h = n - f
    honest = jax.ShapeDtypeStruct((h, d), jnp.float32)
    key = jax.random.key(0)
    if spec.kind == "poisoning":
        xs = jax.ShapeDtypeStruct((2, *feature_shape), jnp.float32)
        ys = jax.ShapeDtypeStruct((2,), jnp.int32)
        jax.eval_shape(
            lambda x, y: spec.impl.apply(key, x, y, spec.params, classes), xs, ys
        )
        return
    params = spec.params
    if isinstance(params, dict) and "own" in params:
        params = {**params, "own": jnp.zeros((f, d), jnp.float32)}
    if spec.kind == "stateful":
        jax.eval_shape(
            lambda x: spec.impl.apply(key, x, spec.impl.init(x), params, f)[0], honest
        )
    else:
        jax.eval_shape(lambda x: spec.impl.apply(key, x, params, f), honest)
