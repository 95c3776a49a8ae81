"""The study's statistics: intervals over seeds, paired differences, effective data transferred."""
import math

import numpy as np
import pytest
from scipy import stats

from gptlab import stats as intervals
from projects.pretrain_vs_finetune import transfer

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)


def test_t_interval_matches_hand_computation():
    interval = intervals.t_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # sample std of 1, 2, 3 is 1
    assert interval.mean == pytest.approx(2.0)
    assert (interval.low, interval.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert interval.n == 3 and interval.excludes(-1.0) and not interval.excludes(0.0)


def test_t_interval_of_one_value_is_unbounded():
    interval = intervals.t_interval([0.5])
    assert interval.mean == 0.5 and math.isinf(interval.low) and math.isinf(interval.high)
    assert not interval.excludes(0.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_t_interval_refuses_empty_or_nonfinite(bad):
    with pytest.raises(ValueError):
        intervals.t_interval(bad)


def test_paired_difference_matches_scipy_paired_t_test():
    a = {0: 2.31, 1: 2.35, 2: 2.29, 3: 2.40}
    b = {0: 2.20, 1: 2.27, 2: 2.25, 3: 2.21, 9: 5.0}  # seed 9 has no partner and is ignored
    interval = intervals.paired_difference(a, b)
    seeds = [0, 1, 2, 3]
    expected = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(0.95)
    assert interval.n == 4
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high), rel=1e-12)


def test_paired_difference_needs_common_seeds():
    with pytest.raises(ValueError, match="no common seeds"):
        intervals.paired_difference({0: 1.0}, {1: 1.0})


def _power_law(tokens, scale=12.0, exponent=0.12):
    return scale * np.asarray(tokens, float) ** -exponent


SCRATCH_D = np.array([1e3, 4e3, 1.6e4, 6.4e4, 2.56e5, 1.024e6])


def test_effective_data_inverts_a_power_law_scratch_curve_exactly():
    # A pure power law is a straight line in log-log space, so interpolation is exact.
    for true_d in (1.0e3, 2.5e3, 3.7e4, 9.9e5, 1.024e6):
        point = transfer.effective_data(SCRATCH_D, _power_law(SCRATCH_D), 500.0, float(_power_law(true_d)))
        assert point.censored is None
        assert point.effective_tokens == pytest.approx(true_d, rel=1e-9)
        assert point.transferred_tokens == pytest.approx(true_d - 500.0, rel=1e-9)


def test_effective_data_outside_the_scratch_curve_is_censored_not_extrapolated():
    losses = _power_law(SCRATCH_D)
    better = transfer.effective_data(SCRATCH_D, losses, 1e3, float(losses[-1]) * 0.9)
    assert better.censored == "above" and better.bound == SCRATCH_D[-1]
    assert better.effective_tokens is None and better.transferred_tokens is None
    worse = transfer.effective_data(SCRATCH_D, losses, 1e3, float(losses[0]) * 1.1)
    assert worse.censored == "below" and worse.bound == SCRATCH_D[0] and worse.transferred_tokens is None


def test_scratch_curve_that_rises_is_read_through_its_running_minimum():
    d = [1e3, 1e4, 1e5, 1e6]
    losses = [3.0, 2.0, 2.2, 1.5]  # the 1e5 point is noise above the 1e4 one
    tokens, envelope = transfer.scratch_envelope(d[::-1], losses[::-1])  # order does not matter
    assert list(tokens) == d and list(envelope) == [3.0, 2.0, 2.0, 1.5]
    # A loss on the plateau maps to the first D that reached it.
    assert transfer.effective_data(d, losses, 10.0, 2.0).effective_tokens == pytest.approx(1e4)


def test_transfer_law_fit_recovers_known_exponents_end_to_end():
    """Synthetic study: the fine-tuned models behave exactly as scratch models with D_F + D_T tokens."""
    k, alpha, beta = 30.0, 0.18, 0.38
    rng = np.random.default_rng(0)
    rows = []
    for n_params in (1e5, 4e5, 1.6e6):
        scratch_d = np.geomspace(1e3, 1e8, 8)
        scale = 15.0 * (n_params / 1e5) ** -0.05
        scratch_loss = _power_law(scratch_d, scale)
        for d_f in np.geomspace(1e3, 1e5, 5):
            d_t = k * d_f ** alpha * n_params ** beta * math.exp(rng.normal(0, 0.05))
            point = transfer.effective_data(scratch_d, scratch_loss, d_f, float(_power_law(d_f + d_t, scale)))
            assert point.censored is None
            rows.append((d_f, n_params, point.transferred_tokens))
    d_f, n, d_t = map(np.array, zip(*rows))
    fit = transfer.fit_transfer_law(d_f, n, d_t)
    assert fit.n == 15 and fit.r_squared > 0.95
    assert fit.alpha_interval[0] < alpha < fit.alpha_interval[1]
    assert fit.beta_interval[0] < beta < fit.beta_interval[1]
    assert fit.alpha == pytest.approx(alpha, abs=0.05) and fit.beta == pytest.approx(beta, abs=0.05)


def test_transfer_law_fit_is_exact_on_noiseless_data():
    d_f = np.array([1e3, 1e4, 1e5, 1e3, 1e4, 1e5])
    n = np.array([1e5, 1e5, 1e5, 1e6, 1e6, 1e6])
    fit = transfer.fit_transfer_law(d_f, n, 2.0 * d_f ** 0.2 * n ** 0.4)
    assert (fit.k, fit.alpha, fit.beta) == pytest.approx((2.0, 0.2, 0.4), rel=1e-6)
    np.testing.assert_allclose(fit.predict(d_f, n), 2.0 * d_f ** 0.2 * n ** 0.4, rtol=1e-9)


@pytest.mark.parametrize("d_t,n,message", [
    ([1.0, -2.0, 3.0, 4.0], [1e5, 1e5, 1e6, 1e6], "positive"),
    ([1.0, 2.0, 3.0, 4.0], [1e5] * 4, "two model sizes"),
    ([1.0, 2.0, 3.0], [1e5, 1e6, 1e6], "at least 4 points"),
])
def test_transfer_law_fit_refuses_what_it_cannot_fit(d_t, n, message):
    with pytest.raises(ValueError, match=message):
        transfer.fit_transfer_law([1e3 * (i + 1) for i in range(len(d_t))], n, d_t)


# -- Holm, paired p-values, and the censored (Tobit) fit ------------------------------------------------------------


def test_holm_against_hand_computed_values():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06 (monotone).
    adjusted, reject = intervals.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert reject == [True, False, False, True]
    # Capped at 1; a step-down stops at the first hypothesis kept even when a later raw p would pass alone.
    adjusted, reject = intervals.holm([0.5, 0.9, 0.012, 0.013], alpha=0.05)
    assert adjusted == pytest.approx([1.0, 1.0, 0.048, 0.048 + 0 * 0.039])  # 0.013 x 3 = 0.039 -> raised to 0.048
    assert reject == [False, False, True, True]
    # An untestable comparison (nan) still counts toward m and is never rejected.
    adjusted, reject = intervals.holm([0.01, float("nan"), 0.03])
    assert adjusted[0] == pytest.approx(0.03) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.06)
    assert reject == [True, False, False]
    assert intervals.holm([]) == ([], [])


def test_paired_p_value_matches_scipy():
    a = {0: 2.31, 1: 2.35, 2: 2.29, 3: 2.40}
    b = {0: 2.20, 1: 2.27, 2: 2.25, 3: 2.21, 9: 5.0}
    expected = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)]).pvalue
    assert intervals.paired_p_value(a, b) == pytest.approx(expected, rel=1e-10)
    assert math.isnan(intervals.paired_p_value({0: 1.0}, {0: 2.0}))


def _tobit_data(n_points=240, alpha=0.3, beta=0.6, log_k=1.0, sigma=0.5, ceiling=None, seed=0):
    """log D_T = log k + alpha log D_F + beta log N + noise; D_T above `ceiling` seen only as a lower bound there."""
    rng = np.random.default_rng(seed)
    d_f = np.exp(rng.uniform(math.log(1e3), math.log(1e6), n_points))
    n = rng.choice([1e4, 4e4, 1.6e5, 6.4e5], n_points)
    log_dt = log_k + alpha * np.log(d_f) + beta * np.log(n) + rng.normal(0, sigma, n_points)
    obs = []
    for f, p, y in zip(d_f, n, log_dt):
        censored = ceiling is not None and y > math.log(ceiling)
        obs.append(transfer.Observation(float(f), float(p), ">" if censored else "=",
                                        ceiling if censored else float(math.exp(y))))
    return obs


def test_censored_fit_without_bounds_is_least_squares():
    """With no bound in the data the normal likelihood's maximum is the least-squares fit, sigma its ML residual."""
    obs = _tobit_data(60, ceiling=None)
    fit = transfer.fit_censored_transfer_law(obs)
    ols = transfer.fit_transfer_law([o.fine_tuned_tokens for o in obs], [o.params for o in obs],
                                    [o.value for o in obs])
    assert (fit.alpha, fit.beta) == pytest.approx((ols.alpha, ols.beta), abs=1e-4)
    assert fit.k == pytest.approx(ols.k, rel=1e-3)
    residual = np.log([o.value for o in obs]) - np.log(ols.predict([o.fine_tuned_tokens for o in obs],
                                                                   [o.params for o in obs]))
    assert fit.sigma == pytest.approx(math.sqrt(np.mean(residual ** 2)), rel=1e-3)  # ML: RSS / n, not n - 3
    assert fit.n_exact == 60 and fit.n_lower == fit.n_upper == 0


def test_censored_fit_recovers_the_law_where_survivors_only_is_biased():
    alpha, beta = 0.3, 0.6
    obs = _tobit_data(alpha=alpha, beta=beta, ceiling=1e5)
    lower = sum(o.kind == ">" for o in obs)
    assert 0.25 * len(obs) < lower < 0.6 * len(obs)  # a good part of the points are censored
    fit = transfer.fit_censored_transfer_law(obs)
    assert fit.n_lower == lower
    assert fit.alpha == pytest.approx(alpha, abs=0.06) and fit.beta == pytest.approx(beta, abs=0.06)
    assert fit.sigma == pytest.approx(0.5, abs=0.1)
    survivors = [o for o in obs if o.kind == "="]
    ols = transfer.fit_transfer_law([o.fine_tuned_tokens for o in survivors], [o.params for o in survivors],
                                    [o.value for o in survivors])
    # Dropping the points above the ceiling keeps only the low draws where the law is high: both slopes flatten,
    # and the truth lies outside the survivors' own 95% intervals.
    assert ols.alpha < alpha - 0.04 and ols.beta < beta - 0.07
    assert not ols.alpha_interval[0] < alpha < ols.alpha_interval[1]
    assert not ols.beta_interval[0] < beta < ols.beta_interval[1]


def test_censored_fit_is_the_maximum_of_an_independently_written_likelihood():
    """scipy.stats' normal log pdf, log sf and log cdf, maximised by Nelder-Mead (no gradient): the same optimum."""
    obs = _tobit_data(80, ceiling=1e5, seed=3)
    obs += [transfer.Observation(2e3, 1e4, "<", 50.0), transfer.Observation(5e3, 4e4, "<", 3e3)]  # upper bounds
    x = np.array([[1.0, math.log(o.fine_tuned_tokens), math.log(o.params)] for o in obs])
    y = np.log([o.value for o in obs])
    kind = np.array([o.kind for o in obs])

    def log_likelihood(log_k, alpha, beta, sigma):
        mu = x @ np.array([log_k, alpha, beta])
        return (stats.norm.logpdf(y[kind == "="], mu[kind == "="], sigma).sum()
                + stats.norm.logsf(y[kind == ">"], mu[kind == ">"], sigma).sum()
                + stats.norm.logcdf(y[kind == "<"], mu[kind == "<"], sigma).sum())

    fit = transfer.fit_censored_transfer_law(obs)
    assert fit.n_upper == 2 and fit.n_lower > 10
    ours = log_likelihood(math.log(fit.k), fit.alpha, fit.beta, fit.sigma)
    assert fit.log_likelihood == pytest.approx(ours, rel=1e-9)
    from scipy import optimize
    best = optimize.minimize(lambda t: -log_likelihood(t[0], t[1], t[2], math.exp(t[3])),
                             [math.log(fit.k) + 0.3, fit.alpha - 0.1, fit.beta + 0.1, math.log(fit.sigma) + 0.2],
                             method="Nelder-Mead", options=dict(xatol=1e-8, fatol=1e-10, maxiter=20_000))
    assert ours >= -best.fun - 1e-6
    assert (fit.alpha, fit.beta) == pytest.approx((best.x[1], best.x[2]), abs=1e-3)


def test_censored_observations_say_what_each_point_is():
    E = transfer.EffectiveData
    points = [E(100.0, 2.0, 400.0),  # measured: D_T = 300
              E(100.0, 2.0, 50.0),  # measured D_T <= 0
              E(100.0, 1.0, None, "above", 1000.0),  # D_T > 900
              E(1000.0, 1.0, None, "above", 1000.0),  # D_T > 0: no information
              E(100.0, 3.0, None, "below", 500.0),  # D_T < 400
              E(1000.0, 3.0, None, "below", 500.0)]  # worse than scratch with twice the data: D_T <= 0
    obs, notes = transfer.censored_observations(points, [1e4] * len(points))
    assert [(o.kind, o.value) for o in obs] == [("=", 300.0), ("<", 1.0), (">", 900.0), ("<", 400.0), ("<", 1.0)]
    assert notes == {transfer.AT_ONE_TOKEN: 2, transfer.UNINFORMATIVE: 1}


@pytest.mark.parametrize("obs,message", [
    ([transfer.Observation(1e3, 1e4, "=", 5.0)] * 4, "two model sizes"),
    ([transfer.Observation(1e3, 1e4, "=", 5.0), transfer.Observation(1e3, 1e5, "=", 5.0),
      transfer.Observation(1e4, 1e5, ">", 5.0), transfer.Observation(1e5, 1e5, ">", 5.0)], "at least 3 measured"),
])
def test_censored_fit_refuses_what_it_cannot_fit(obs, message):
    with pytest.raises(ValueError, match=message):
        transfer.fit_censored_transfer_law(obs)
