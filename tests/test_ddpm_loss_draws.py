"""refdiff.ddpm.ddpm_loss's draws and dtypes, by replaying the generator: i covers all of
{0..N-1} (a 4-step chain), the network's dropout gets the caller's generator after i, eps and
(only when label_dropout > 0) the label uniforms, a float32 network is called in float32 and
its gradient comes back in float32, and B = 1 is a batch while B = 0 is refused."""
import numpy as np
import pytest

from refdiff import ddpm
from refdiff.backend import REFERENCE
from refdiff.sde import DDPMSchedule

SCHED4 = DDPMSchedule(num_steps=4, beta_start=0.1, beta_end=0.5)


class Net:
    """eps_theta = 0.3 x; records its inputs and, when it uses dropout, the generator's state."""

    kind, name, ops = "eps", "net", REFERENCE

    def __init__(self, dtype=np.float64, num_classes=0, uses_dropout=False):
        self.dtype, self.uses_dropout = np.dtype(dtype), uses_dropout
        self.config = {"num_classes": num_classes} if num_classes else {}

    def forward(self, x, t, y=None, rng=None):
        self.x, self.t, self.y, self.rng = x.copy(), t.copy(), y, rng
        self.rng_state = None if rng is None else rng.bit_generator.state
        return (0.3 * x).astype(self.dtype)

    def backward(self, dy):
        self.dy = dy


def test_every_step_is_drawn():
    B = 64
    x0 = np.random.default_rng(0).uniform(-1, 1, (B, 3))
    m = Net()
    ddpm.ddpm_loss(m, SCHED4, x0, np.random.default_rng(5))
    i = np.random.default_rng(5).integers(0, 4, size=B)
    assert set(i.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(m.t, (i + 1) / 4)


@pytest.mark.parametrize("num_classes, label_dropout", [(0, 0.0), (3, 0.0), (3, 0.3)])
def test_the_network_draws_its_dropout_after_the_loss(num_classes, label_dropout):
    B, rng = 8, np.random.default_rng(11)
    x0 = np.random.default_rng(1).uniform(-1, 1, (B, 5))
    y = np.arange(B) % 3 if num_classes else None
    m = Net(num_classes=num_classes, uses_dropout=True)
    ddpm.ddpm_loss(m, SCHED4, x0, rng, y=y, label_dropout=label_dropout)
    assert m.rng is rng
    replay = np.random.default_rng(11)
    replay.integers(0, 4, size=B)
    replay.standard_normal(x0.shape)
    if label_dropout:
        replay.random(B)
    assert m.rng_state == replay.bit_generator.state
    if num_classes:
        assert m.y.shape == (B,) and m.y.dtype == np.int64
    without = Net(num_classes=num_classes)               # no dropout: no generator handed over
    ddpm.ddpm_loss(without, SCHED4, x0, np.random.default_rng(11), y=y, label_dropout=label_dropout)
    assert without.rng is None


def test_a_float32_network_is_called_and_differentiated_in_float32():
    x0 = np.random.default_rng(2).uniform(-1, 1, (4, 6))
    m = Net(np.float32)
    loss = ddpm.ddpm_loss(m, SCHED4, x0, np.random.default_rng(3))
    assert m.x.dtype == np.float32 and m.t.dtype == np.float32 and m.dy.dtype == np.float32
    r = np.random.default_rng(3)
    i = r.integers(0, 4, size=4)
    eps = r.standard_normal(x0.shape)
    ab = SCHED4.alpha_bars[i][:, None]
    xt = (np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps).astype(np.float32)
    out = (0.3 * xt).astype(np.float32)
    want = np.mean((out - eps.astype(np.float32)) ** 2, dtype=np.float64)
    assert loss == pytest.approx(want, rel=1e-6)


def test_batch_sizes():
    m = Net()
    assert np.isfinite(ddpm.ddpm_loss(m, SCHED4, np.ones((1, 3)), np.random.default_rng(0)))
    assert m.x.shape == (1, 3)
    with pytest.raises(ValueError, match="B >= 1"):
        ddpm.ddpm_loss(m, SCHED4, np.ones((0, 3)), np.random.default_rng(0))
