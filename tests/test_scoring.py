"""Score's streamed sums (service.scoring) against the bound computed whole: any chunking of the
n x k draws gives the whole-array figures, and the chunked noise is the noise of one draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine import noise_stream, normal
from service.likelihood import LOG_2PI, likelihood as make_likelihood
from service.scoring import ScoreSums, chunk_rows, gaussian_log_ratio

SHAPE = (1, 3, 4)  # [C, H, W] of the test images


def whole(x, params, mu, logvar, eps, z, log_pz, likelihood):
    """The textbook bound on whole [n, k, ...] arrays: what Score computed before it streamed."""
    n, k = params.shape[:2]
    log_px = likelihood.log_prob(x[:, None], params)
    log_qz = -0.5 * (LOG_2PI + logvar[:, None, :] + eps**2).sum(-1)
    if log_pz is None:
        log_pz = -0.5 * (LOG_2PI + z**2).sum(-1)
        kl = -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(-1)
    else:
        kl = (log_qz - log_pz).mean(axis=1)
    log_w = log_px + log_pz - log_qz
    top = log_w.max(axis=1, keepdims=True)
    iwae = (top + np.log(np.exp(log_w - top).sum(axis=1, keepdims=True))).squeeze(1) - math.log(k)
    reconstruction = -log_px.mean(axis=1)
    return {"elbo": -(reconstruction + kl), "reconstruction": reconstruction, "kl": kl, "log_likelihood": iwae}


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 40), d=st.integers(1, 5), flow=st.booleans(),
       likelihood=st.sampled_from(["bernoulli", "gaussian"]), seed=st.integers(0, 2**32), data=st.data())  # fmt: skip
def test_any_chunking_gives_the_whole_arrays_figures(n, k, d, flow, likelihood, seed, data):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, *SHAPE))
    mu, logvar = rng.normal(0, 1, (n, d)), rng.normal(-1, 0.5, (n, d))
    eps = normal(seed, (n, k, d), np.float64)
    z = mu[:, None] + eps * np.exp(0.5 * logvar)[:, None]
    params = rng.normal(0, 2, (n, k, *SHAPE))
    log_pz = rng.normal(-5, 1, (n, k)) if flow else None
    likelihood = make_likelihood(likelihood, SHAPE[0], gaussian_std=0.2)
    expected = whole(x, params, mu, logvar, eps, z, log_pz, likelihood)

    closed_kl = None if flow else -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(-1)
    sums = ScoreSums(x, k, likelihood, closed_kl)
    cuts = sorted(data.draw(st.sets(st.integers(1, n * k - 1), max_size=8)) if n * k > 1 else set())
    flat = lambda a: a.reshape(n * k, *a.shape[2:])  # noqa: E731 - image-major rows
    logvars = np.repeat(logvar, k, axis=0)
    for start, end in zip([0, *cuts], [*cuts, n * k]):
        rows = slice(start, end)
        log_ratio = gaussian_log_ratio(flat(eps)[rows], flat(z)[rows], logvars[rows], None if log_pz is None else flat(log_pz)[rows])
        # The chunk's rows reach the reducer as its batches carry them: here in two slices.
        reduce, mid = sums.reducer((start + np.arange(end - start)) // k), (end - start) // 2
        chunk = flat(params)[rows]
        log_px = np.concatenate([reduce(a, [chunk[a:b]])[0] for a, b in ((0, mid), (mid, len(chunk))) if b > a])
        sums.add(start, log_px, log_ratio)
    got = sums.figures()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-10, atol=1e-9, err_msg=key)


def test_the_noise_drawn_in_chunks_is_the_noise_of_one_draw():
    stream = noise_stream(11)
    chunks = [stream.standard_normal((rows, 3)) for rows in (5, 1, 17, 7)]
    assert np.array_equal(np.concatenate(chunks), normal(11, (30, 3), np.float64))


@pytest.mark.parametrize("values_per_row, total, queue_rows, rows", [
    (64, 1024, 32768, 1024), (35 * 64 * 64, 4096, 32768, 29), (10**9, 5, 32768, 1),
    (64, 5_120_000, 32768, 8192),  # a quarter of the queue: the chunks in flight leave room for others
])  # fmt: skip
def test_a_chunk_holds_a_bounded_number_of_bytes(values_per_row, total, queue_rows, rows):
    assert chunk_rows(values_per_row, total, queue_rows) == rows
