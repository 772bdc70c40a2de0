"""Optimisation by value (refdiff.optim): AdamW against the paper's update written out here,
the EMA against a two-step hand computation, gradient clipping against the global norm.

Tolerance: float64, the same arithmetic in another order: TOL[float64] (a few ulps)."""
import numpy as np
import pytest

from refdiff.nn import make_model
from refdiff.optim import EMA, Adam, clip_grad_norm
from tests.helpers import TOL, assert_close

F64 = TOL[np.dtype(np.float64)]


def _model(seed=0):
    return make_model("mlp", dim=2, widths=[3], emb_dim=4, temb_dim=2, dtype=np.float64, seed=seed)


def _set_grads(model, rng, scale=1.0):
    for g in model.grads.values():
        g[...] = scale * rng.standard_normal(g.shape)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_is_the_papers_update(weight_decay):
    """Kingma & Ba 2015, Alg. 1 with decoupled weight decay (Loshchilov & Hutter 2019):
    m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + eps),
    m^ = m / (1 - b1^t), v^ = v / (1 - b2^t); three steps with fresh gradients."""
    model, rng = _model(), np.random.default_rng(1)
    lr, b1, b2, eps = 0.01, 0.8, 0.95, 1e-3          # away from the defaults, so each one counts
    opt = Adam(model, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    p = {k: a.copy() for k, a in model.params.items()}
    m = {k: np.zeros_like(a) for k, a in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    for t in range(1, 4):
        _set_grads(model, rng, scale=10.0 ** (t - 2))
        for k, g in model.grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            p[k] = p[k] * (1 - lr * weight_decay) - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
        opt.step()
        assert opt.step_count == t
        for k in p:
            assert_close(model.params[k], p[k], name=f"step {t} {k}", **F64)
            assert_close(opt.m[k], m[k], name=f"step {t} m {k}", **F64)
            assert_close(opt.v[k], v[k], name=f"step {t} v {k}", **F64)


def test_adam_state_round_trip_continues_identically():
    a, b, rng = _model(), _model(), np.random.default_rng(2)
    opt_a = Adam(a, lr=0.01)
    _set_grads(a, rng)
    opt_a.step()
    b.load_state(a.state())
    opt_b = Adam(b, lr=0.01)
    opt_b.load_state(opt_a.state())
    assert opt_b.step_count == 1
    _set_grads(a, rng)
    for k in a.grads:
        b.grads[k][...] = a.grads[k]
    opt_a.step()
    opt_b.step()
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k


def test_ema_two_steps_by_hand():
    """e <- d e + (1 - d) p. Without warm-up d = decay; with it d = min(decay, (1+n)/(10+n))
    at update n = 0, 1, ...: 0.1, then 2/11."""
    for warmup, ds in [(False, (0.9, 0.9)), (True, (0.1, 2 / 11))]:
        model = _model()
        ema = EMA(model, decay=0.9, warmup=warmup)
        e = {k: p.copy() for k, p in model.params.items()}
        for step, d in enumerate(ds):
            for k, p in model.params.items():
                p += 1.0 + step                      # move the parameters: e must follow them by (1 - d)
                e[k] = d * e[k] + (1 - d) * p
            ema.update()
            for k in e:
                assert_close(ema.shadow[k], e[k], name=f"warmup={warmup} update {step} {k}", **F64)
        assert ema.num_updates == 2


def test_ema_swap_exchanges_and_restores():
    model = _model()
    ema = EMA(model, decay=0.5, warmup=False)
    before = {k: p.copy() for k, p in model.params.items()}
    for p in model.params.values():
        p += 2.0
    ema.update()                                      # shadow = before + 1
    ema.swap()
    for k, p in model.params.items():
        assert_close(p, before[k] + 1.0, name=k, **F64)
    ema.swap()
    for k, p in model.params.items():
        assert_close(p, before[k] + 2.0, name=k, **F64)
    state = ema.state()
    other = EMA(_model(seed=5), decay=0.5, warmup=False)
    other.load_state(state)
    assert other.num_updates == 1 and all(np.array_equal(other.shadow[k], ema.shadow[k]) for k in state
                                          if k in ema.shadow)
    del state["__num_updates__"]                      # a state saved without the count: warm-up restarts
    other.load_state(state)
    assert other.num_updates == 0


def _global_norm(grads):
    return float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))


@pytest.mark.parametrize("ratio", [1.01, 1.5, 40.0])
def test_clip_grad_norm_scales_to_max_norm(ratio):
    """Above max_norm (just above too) every gradient is scaled by max_norm / (norm + 1e-6)
    (torch's rule): the global norm becomes max_norm up to that 1e-6, the direction is kept,
    and the norm before clipping is returned."""
    model, rng = _model(), np.random.default_rng(3)
    _set_grads(model, rng)
    norm = _global_norm(model.grads)
    for g in model.grads.values():
        g *= 2.0 * ratio / norm                       # global norm 2 ratio
    before = {k: g.copy() for k, g in model.grads.items()}
    total = _global_norm(before)
    returned = clip_grad_norm(model, 2.0)
    assert returned == pytest.approx(total, rel=1e-14)
    assert _global_norm(model.grads) == pytest.approx(2.0 * total / (total + 1e-6), rel=1e-14)
    for k, g in model.grads.items():
        assert_close(g, before[k] * (2.0 / (total + 1e-6)), name=k, **F64)


def test_clip_grad_norm_leaves_small_gradients_alone():
    model, rng = _model(), np.random.default_rng(4)
    _set_grads(model, rng)
    norm = _global_norm(model.grads)
    for g in model.grads.values():
        g *= 0.99 / norm                              # just below max_norm = 1
    before = {k: g.copy() for k, g in model.grads.items()}
    assert clip_grad_norm(model, 1.0) == pytest.approx(_global_norm(before), rel=1e-14)
    assert all(np.array_equal(model.grads[k], before[k]) for k in before)


def test_clip_grad_norm_at_exactly_max_norm_leaves_gradients_alone():
    """"At most max_norm": a norm equal to it is not scaled (by max_norm / (norm + 1e-6))."""
    model = _model()
    for g in model.grads.values():
        g[...] = 0.0
    next(iter(model.grads.values())).reshape(-1)[0] = 1.5
    assert clip_grad_norm(model, 1.5) == 1.5
    assert next(iter(model.grads.values())).reshape(-1)[0] == 1.5


def test_clip_grad_norm_refuses_non_finite_gradients():
    model = _model()
    next(iter(model.grads.values())).reshape(-1)[0] = np.nan
    with pytest.raises(FloatingPointError, match="gradient norm"):
        clip_grad_norm(model, 1.0)
