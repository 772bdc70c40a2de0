"""refdiff.nn.lossfn checked by value where its existing tests are silent: log-softmax is over
the last axis of any array (scipy's log_softmax) and shifts each row by its own maximum, so rows
a thousand apart stay finite; cross-entropy refuses logits that are not (B, K) with B, K >= 1."""
import numpy as np
import pytest
from scipy.special import log_softmax

from refdiff.nn import lossfn


def test_log_softmax_over_the_last_axis_of_rows_far_apart():
    z = np.random.default_rng(0).standard_normal((2, 3, 4))
    z[0] += 1000.0                                   # a global shift would underflow the other rows
    z[1, 0] -= 1000.0
    got = lossfn.log_softmax_forward(z)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, log_softmax(z, axis=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (3,), (2, 3, 1)])
def test_cross_entropy_refuses_logits_that_are_not_b_by_k(shape):
    with pytest.raises(ValueError, match=r"logits must have shape \(B, K\) with B, K >= 1"):
        lossfn.log_softmax_cross_entropy_forward(np.zeros(shape), np.zeros(shape[:1], np.int64))
