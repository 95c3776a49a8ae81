"""Effective data transferred, from stored results only (intervals over seeds: gptlab/stats.py).

- **Effective data transferred** (Hernandez, Kaplan, Henighan, McCandlish 2021,
  "Scaling Laws for Transfer"). A fine-tuned model that saw D_F narrow tokens
  reaches some test loss; D_E is the number of narrow tokens a from-scratch model
  of the same size needs for that loss, read off the scratch curve; pretraining is
  worth D_T = D_E - D_F tokens. `effective_data` reads D_E by interpolating the
  scratch curve linearly in (log tokens, log loss). `fit_transfer_law` fits
  D_T = k * D_F**alpha * N**beta by least squares in log space, with standard
  errors and t-intervals for each exponent, on the uncensored points with D_T > 0 only.
- **The censored fit** (`fit_censored_transfer_law`): the same law by maximum likelihood
  with normal noise on log D_T (a Tobit model), keeping every point: a measured D_T is a
  density term, a bound a survival (or distribution) term of the normal.

Points outside the scratch curve are never extrapolated: a fine-tuned loss below
the best scratch loss only says D_E > the largest scratch D (a lower bound), one
above the worst scratch loss only says D_E < the smallest (an upper bound). The least-
squares fit leaves both out; `censored_observations` turns every point into what the
censored fit reads (see there for D_T <= 0).
"""
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from scipy import optimize
from scipy import special
from scipy import stats



@dataclasses.dataclass(frozen=True)
class EffectiveData:
    """D_E for one fine-tuned point; `censored` is None, "above" (D_E > bound) or "below" (D_E < bound)."""
    fine_tuned_tokens: float  # D_F
    loss: float
    effective_tokens: Optional[float]  # D_E, None when censored
    censored: Optional[str] = None
    bound: Optional[float] = None  # the scratch D that bounds D_E when censored

    @property
    def transferred_tokens(self) -> Optional[float]:
        """D_T = D_E - D_F, or None when censored."""
        if self.effective_tokens is None:
            return None
        return self.effective_tokens - self.fine_tuned_tokens


def scratch_envelope(tokens: Sequence[float], losses: Sequence[float]) -> tuple:
    """The scratch curve as (tokens, loss) sorted by tokens, made non-increasing.

    With early stopping on validation, more data cannot make the best model worse in
    expectation; a measured rise is noise, and keeping it would make D_E ambiguous.
    The running minimum keeps the first point of any plateau.
    """
    d = np.asarray(tokens, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if d.shape != loss.shape or d.ndim != 1 or d.size < 2:
        raise ValueError("the scratch curve needs at least two (tokens, loss) points")
    if np.any(d <= 0) or np.any(loss <= 0):
        raise ValueError("scratch tokens and losses must be positive (they are read in log space)")
    order = np.argsort(d)
    d, loss = d[order], loss[order]
    if np.unique(d).size != d.size:
        raise ValueError("the scratch curve has two points with the same token count: average seeds first")
    return d, np.minimum.accumulate(loss)


def effective_data(scratch_tokens: Sequence[float], scratch_losses: Sequence[float],
                   fine_tuned_tokens: float, fine_tuned_loss: float) -> EffectiveData:
    """D_E for a fine-tuned model: where the scratch curve reaches its loss (log-log interpolation)."""
    d, loss = scratch_envelope(scratch_tokens, scratch_losses)
    point = dict(fine_tuned_tokens=float(fine_tuned_tokens), loss=float(fine_tuned_loss))
    if fine_tuned_loss < loss[-1]:
        return EffectiveData(**point, effective_tokens=None, censored="above", bound=float(d[-1]))
    if fine_tuned_loss > loss[0]:
        return EffectiveData(**point, effective_tokens=None, censored="below", bound=float(d[0]))
    # The first segment whose lower end reaches the loss; on a plateau, its smallest D.
    i = int(np.argmax(loss <= fine_tuned_loss))
    if i == 0 or loss[i] == fine_tuned_loss:
        return EffectiveData(**point, effective_tokens=float(d[i]))
    log_d, log_l = np.log(d[i - 1:i + 1]), np.log(loss[i - 1:i + 1])
    frac = (math.log(fine_tuned_loss) - log_l[0]) / (log_l[1] - log_l[0])
    return EffectiveData(**point, effective_tokens=float(math.exp(log_d[0] + frac * (log_d[1] - log_d[0]))))


@dataclasses.dataclass(frozen=True)
class TransferFit:
    """D_T = k * D_F**alpha * N**beta, fitted in log space on `n` uncensored points with D_T > 0."""
    k: float
    alpha: float
    beta: float
    alpha_se: float
    beta_se: float
    alpha_interval: tuple
    beta_interval: tuple
    n: int
    r_squared: float

    def predict(self, fine_tuned_tokens, params):
        return self.k * np.asarray(fine_tuned_tokens, float) ** self.alpha * np.asarray(params, float) ** self.beta


def fit_transfer_law(fine_tuned_tokens: Sequence[float], params: Sequence[float],
                     transferred_tokens: Sequence[float], confidence: float = 0.95) -> TransferFit:
    """Least squares of log D_T on [1, log D_F, log N]; intervals from the residual variance (t, n-3 dof).

    Callers pass only uncensored points with D_T > 0 (a negative D_T, pretraining that
    hurt, has no logarithm; count those separately). N spanning a single size leaves
    beta undetermined, which is an error rather than a number.
    """
    df_, n_, dt = (np.asarray(v, dtype=np.float64) for v in (fine_tuned_tokens, params, transferred_tokens))
    if not (df_.shape == n_.shape == dt.shape) or df_.ndim != 1:
        raise ValueError("D_F, N and D_T must be equal-length lists")
    if np.any(dt <= 0) or np.any(df_ <= 0) or np.any(n_ <= 0):
        raise ValueError("the transfer fit takes only positive D_F, N and D_T (drop censored and negative points)")
    if np.unique(n_).size < 2:
        raise ValueError("the transfer fit needs at least two model sizes to determine beta")
    if df_.size < 4:
        raise ValueError(f"the transfer fit needs at least 4 points (3 coefficients), got {df_.size}")
    x = np.column_stack([np.ones_like(df_), np.log(df_), np.log(n_)])
    y = np.log(dt)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    dof = y.size - 3
    sigma2 = float(residual @ residual) / dof if dof > 0 else math.nan
    cov = sigma2 * np.linalg.inv(x.T @ x)
    se = np.sqrt(np.diag(cov))
    t = float(stats.t.ppf(0.5 + confidence / 2, df=dof)) if dof > 0 else math.inf
    total = float(((y - y.mean()) ** 2).sum())
    # Equal D_T leave nothing to explain: R^2 is 1 (their mean's rounding makes `total` ~1e-31, not 0).
    r2 = 1.0 - float(residual @ residual) / total if np.ptp(y) > 0 else 1.0
    return TransferFit(k=float(math.exp(coef[0])), alpha=float(coef[1]), beta=float(coef[2]),
                       alpha_se=float(se[1]), beta_se=float(se[2]),
                       alpha_interval=(float(coef[1] - t * se[1]), float(coef[1] + t * se[1])),
                       beta_interval=(float(coef[2] - t * se[2]), float(coef[2] + t * se[2])),
                       n=int(y.size), r_squared=r2)


# Where D_T <= 0 is bounded on the log scale: one token, the smallest amount of data there is.
ONE_TOKEN = 1.0
AT_ONE_TOKEN = "with D_T <= 0 entered as D_T < 1 token"
UNINFORMATIVE = "lower bounds D_T > 0 (no information)"


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the censored fit reads of one point: log D_T is `kind` ("=", ">" or "<") log `value`."""
    fine_tuned_tokens: float
    params: float
    kind: str
    value: float


def censored_observations(points: Sequence, params: Sequence[float]) -> tuple:
    """([Observation], {why: count}) for EffectiveData points and each one's N.

    - D_E read inside the curve and D_T > 0: an exact log D_T.
    - D_E > bound (the fine-tuned model beats every scratch run): D_T > bound - D_F, a lower
      bound; when bound - D_F <= 0 it says only D_T > 0, which a law of positive D_T always
      meets: it adds nothing to the likelihood and is counted as uninformative.
    - D_T <= 0 measured, or D_E < bound with bound - D_F <= 0 (no better than scratch with the same
      data): pretraining's worth is below what the scratch curve resolves. A log-normal D_T cannot
      be <= 0, so the point enters as censored from above at ONE_TOKEN (log D_T < 0): the least
      data there is, the tightest bound that stays finite. The report also shows the fit without them.
    - D_E < bound with bound - D_F > 0: D_T < bound - D_F, an upper bound.
    """
    out, notes = [], {}
    for p, n in zip(points, params):
        d_f = p.fine_tuned_tokens
        if p.censored is None:
            d_t = p.transferred_tokens
            obs = Observation(d_f, n, "=", d_t) if d_t > 0 else Observation(d_f, n, "<", ONE_TOKEN)
            if d_t <= 0:
                notes[AT_ONE_TOKEN] = notes.get(AT_ONE_TOKEN, 0) + 1
        elif p.censored == "above":
            if p.bound - d_f <= 0:
                notes[UNINFORMATIVE] = notes.get(UNINFORMATIVE, 0) + 1
                obs = None
            else:
                obs = Observation(d_f, n, ">", p.bound - d_f)
        else:
            bound = p.bound - d_f
            obs = Observation(d_f, n, "<", bound if bound > 0 else ONE_TOKEN)
            if bound <= 0:
                notes[AT_ONE_TOKEN] = notes.get(AT_ONE_TOKEN, 0) + 1
        if obs is not None:
            out.append(obs)
    return out, notes


@dataclasses.dataclass(frozen=True)
class CensoredFit:
    """D_T = k * D_F**alpha * N**beta with log-normal noise sigma, by censored maximum likelihood."""
    k: float
    alpha: float
    beta: float
    sigma: float
    n_exact: int
    n_lower: int
    n_upper: int
    log_likelihood: float

    @property
    def n(self) -> int:
        return self.n_exact + self.n_lower + self.n_upper

    def predict(self, fine_tuned_tokens, params):
        return self.k * np.asarray(fine_tuned_tokens, float) ** self.alpha * np.asarray(params, float) ** self.beta


def fit_censored_transfer_law(observations: Sequence[Observation]) -> CensoredFit:
    """Maximum likelihood of log D_T ~ Normal(log k + alpha log D_F + beta log N, sigma^2), bounds censored.

    Exact points add log pdf, lower bounds log sf, upper bounds log cdf of the normal (log_ndtr:
    stable far in the tails). Needs 2+ sizes and 3+ exact points (a likelihood of bounds
    alone has no finite maximum). The log D_F and log N columns are centred so the optimiser
    sees a well-conditioned problem; L-BFGS-B from the exact points' least squares."""
    obs = list(observations)
    if len({o.params for o in obs}) < 2:
        raise ValueError("the censored fit needs at least two model sizes to determine beta")
    exact = [o for o in obs if o.kind == "="]
    if len(exact) < 3:
        raise ValueError(f"the censored fit needs at least 3 measured D_T (not bounds), got {len(exact)}")
    x = np.array([[math.log(o.fine_tuned_tokens), math.log(o.params)] for o in obs])
    y = np.log([o.value for o in obs])
    kinds = np.array([o.kind for o in obs])
    centre = x.mean(axis=0)
    design = np.column_stack([np.ones(len(obs)), x - centre])
    eq, lo, hi = kinds == "=", kinds == ">", kinds == "<"

    sign = np.where(lo, -1.0, 1.0)  # a lower bound's log sf(z) is log cdf(-z)

    def negative_log_likelihood(theta):
        """Its value and gradient (analytic: the optimiser runs once per bootstrap replicate)."""
        coef, log_sigma = theta[:3], theta[3]
        sigma = math.exp(log_sigma)
        z = (y - design @ coef) / sigma
        value = (np.sum(-0.5 * z[eq] ** 2 - log_sigma - 0.5 * math.log(2 * math.pi))
                 + np.sum(special.log_ndtr(sign[~eq] * z[~eq])))
        # d/dz: exact -z; bounds sign * pdf/cdf of (sign z); and dz/dcoef = -design / sigma, dz/dlog_sigma = -z.
        dz = np.empty_like(z)
        dz[eq] = -z[eq]
        u = sign[~eq] * z[~eq]
        dz[~eq] = sign[~eq] * np.exp(-0.5 * u ** 2 - 0.5 * math.log(2 * math.pi) - special.log_ndtr(u))
        grad_coef = -(dz @ design) / sigma
        grad_log_sigma = -float(dz @ z) - float(eq.sum())
        return -value, -np.concatenate([grad_coef, [grad_log_sigma]])

    start, *_ = np.linalg.lstsq(design[eq], y[eq], rcond=None)
    spread = float(np.std(y[eq] - design[eq] @ start)) or 0.1
    theta0 = np.concatenate([start, [math.log(max(spread, 0.05))]])
    # sigma is kept in [e^-6, e^4]: a few exact points can otherwise drive it to zero.
    bounds = [(None, None)] * 3 + [(-6.0, 4.0)]
    result = optimize.minimize(negative_log_likelihood, theta0, jac=True, method="TNC", bounds=bounds)
    if not np.all(np.isfinite(result.x)):
        raise ValueError(f"the censored fit did not converge: {result.message}")
    b0, alpha, beta = result.x[:3]
    log_k = b0 - alpha * centre[0] - beta * centre[1]
    return CensoredFit(k=float(math.exp(log_k)), alpha=float(alpha), beta=float(beta),
                       sigma=float(math.exp(result.x[3])), n_exact=int(eq.sum()), n_lower=int(lo.sum()),
                       n_upper=int(hi.sum()), log_likelihood=float(-result.fun))


def percentile_interval(values: Sequence[float], confidence: float = 0.95) -> tuple:
    """The bootstrap's two-sided percentile interval of `values` (finite ones)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan)
    tail = 100 * (1 - confidence) / 2
    return (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
