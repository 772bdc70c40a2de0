"""DDIM's timestep subsequences against the formulas of the official sources.

- "uniform": DDIM's code (ermongroup/ddim, runners/diffusion.py, skip_type "uniform"):
  seq = range(0, N, N // S). It has exactly S steps only when S divides N (then it is also
  diffusers' "leading"); for other S it has ceil(N / (N // S)) steps, and diffusers'
  "leading" (S steps of N // S) starts at (S - 1)(N // S), far from N - 1 (S = 600: i = 599,
  sqrt(abar) = 0.16). refdiff refuses those S with an error that names the alternatives.
- "linspace": diffusers' DDIMScheduler timestep_spacing="linspace":
  np.linspace(0, N - 1, S).round()[::-1] -- always from N - 1 down to 0.
- "quadratic": DDIM's skip_type "quad": [int(s) for s in np.linspace(0, sqrt(0.8 N), S) ** 2];
  its repeated entries (S >= 30 at N = 1000) are steps from abar_i to abar_i, which DDIM's
  update makes the identity, so refdiff keeps each index once.
The expected values are the sources' expressions written out here, not refdiff's code.
"""
import numpy as np
import pytest

from refdiff import ddpm


@pytest.mark.parametrize("N, S", [(1000, 50), (1000, 100), (1000, 1000), (1000, 1), (100, 20)])
def test_uniform_is_ddims_skip_when_S_divides_N(N, S):
    assert list(ddpm.ddim_timesteps(N, S, "uniform")) == list(range(0, N, N // S))[::-1]


@pytest.mark.parametrize("S", [3, 30, 600, 999])
def test_uniform_refuses_S_that_do_not_divide_N(S):
    with pytest.raises(ValueError, match=rf"steps = {S} does not divide N = 1000.*linspace.*trailing"):
        ddpm.ddim_timesteps(1000, S, "uniform")


@pytest.mark.parametrize("N, S", [(1000, 50), (1000, 30), (1000, 600), (1000, 999), (10, 10), (7, 3)])
def test_linspace_is_diffusers_linspace(N, S):
    want = np.linspace(0, N - 1, S).round()[::-1].astype(np.int64)
    got = ddpm.ddim_timesteps(N, S, "linspace")
    assert list(got) == list(want) and got[0] == N - 1 and got[-1] == 0


@pytest.mark.parametrize("S", [10, 20, 50, 100])
def test_quadratic_is_ddims_quad_sequence(S):
    """S = 50 and 100 are DDIM's own CIFAR-10 settings at N = 1000."""
    seq = [int(s) for s in list(np.linspace(0, np.sqrt(1000 * 0.8), S) ** 2)]
    got = ddpm.ddim_timesteps(1000, S, "quadratic")
    assert list(got) == sorted(set(seq), reverse=True)
    assert len(got) == {10: 10, 20: 20, 50: 49, 100: 96}[S]

