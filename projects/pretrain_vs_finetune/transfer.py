"""Effective data transferred, from stored results only (intervals over seeds: gptlab/stats.py).

- **Effective data transferred** (Hernandez, Kaplan, Henighan, McCandlish 2021,
  "Scaling Laws for Transfer"). A fine-tuned model that saw D_F narrow tokens
  reaches some test loss; D_E is the number of narrow tokens a from-scratch model
  of the same size needs for that loss, read off the scratch curve; pretraining is
  worth D_T = D_E - D_F tokens. `effective_data` reads D_E by interpolating the
  scratch curve linearly in (log tokens, log loss). `fit_transfer_law` fits
  D_T = k * D_F**alpha * N**beta by least squares in log space, with standard
  errors and t-intervals for each exponent.

Points outside the scratch curve are never extrapolated: a fine-tuned loss below
the best scratch loss only says D_E > the largest scratch D (a lower bound), one
above the worst scratch loss only says D_E < the smallest (an upper bound). Both are
returned as censored and left out of the fit; the report says how many there were.
"""
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
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
