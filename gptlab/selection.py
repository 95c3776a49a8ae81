"""Choosing on validation: the selection metric, early stopping and the best checkpoint's record.

Every choice a run or a study makes (when to stop, which checkpoint is "best",
which learning rate wins) reads the validation split (`data.eval_split`) through
one metric, `train.selection_metric`; the test split (`data.test_split`) is only
ever reported. `EarlyStopping` is the loop's host-side record of that choice:
the best value so far, its step and validation metrics, and the evaluations
since. It is saved with every checkpoint (the `selection` item), so a resumed
run stops at exactly the evaluation the uninterrupted one would have.
"""
import dataclasses
import math
from typing import Optional

import numpy as np

from gptlab.errors import UserError

# What each task's evaluation produces during training (steps.evaluate), i.e. what
# train.selection_metric may name; the report reads the same names from result.json.
TASK_METRICS = {
    "lm": ("eval_loss", "eval_perplexity"),
    "sft": ("eval_loss", "eval_perplexity"),
    "classify": ("eval_loss", "eval_accuracy", "eval_macro_f1"),
}
_HIGHER_IS_BETTER = ("accuracy", "f1", "exact_match", "parse_rate")


def higher_is_better(metric: str) -> bool:
    return any(word in metric for word in _HIGHER_IS_BETTER)


def check_validation_metric(metric: str, what: str = "the selection metric") -> None:
    """Choices read validation only: a test metric is refused in one line."""
    if metric.startswith("test"):
        raise UserError(f"{what}={metric!r} reads the test split, which is only ever reported (choices read "
                        "validation only): choose on a validation metric such as eval_loss or eval_accuracy")


def choose_on_validation(scores: dict, metric: str, what: str = "the selection metric"):
    """The key of `scores` ({key: [validation values]}) whose finite values have the best mean `metric`.

    The one choice-on-validation of reports and studies (a learning rate, a configuration).
    Ties go to the smallest key (e.g. the lower learning rate). Reading a test metric is an
    error: the test split is only ever reported. None when no key has a finite value.
    """
    check_validation_metric(metric, what)
    means = {}
    for key, values in scores.items():
        finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if finite:
            means[key] = float(np.mean(finite))
    if not means:
        return None
    sign = -1.0 if higher_is_better(metric) else 1.0
    order = lambda key: (0, key, "") if isinstance(key, (int, float)) else (1, 0, str(key))  # None and text last
    return min(means, key=lambda key: (sign * means[key], order(key)))


def mode(metric: str) -> str:
    """Orbax's best_mode for `metric`: "max" for accuracies and rates, else "min"."""
    return "max" if higher_is_better(metric) else "min"


def better(a: float, b: Optional[float], metric: str) -> bool:
    """Is `a` strictly better than `b` (None: nothing yet)?"""
    if b is None:
        return math.isfinite(a)
    return a > b if higher_is_better(metric) else a < b


def task_of(config) -> str:
    finetune = config.get("finetune") if hasattr(config, "get") else None
    return (finetune.get("task") if finetune else None) or "lm"


def check_config(config) -> None:
    """Bad selection settings end here, before anything is written."""
    train, task = config.train, task_of(config)
    patience, metric = train.get("early_stopping_patience", 0), train.get("selection_metric", "eval_loss")
    if train.get("early_stopping_min_delta", 0.0) < 0:
        raise UserError(f"train.early_stopping_min_delta={train.early_stopping_min_delta} must be >= 0 (the least "
                        "change of the selection metric that counts as an improvement; 0: any)")
    if patience < 0:
        raise UserError(f"train.early_stopping_patience={patience} must be >= 0 (evaluations without improvement "
                        "before stopping; 0: off)")
    produced = TASK_METRICS.get(task, ("eval_loss",))
    if metric not in produced:
        raise UserError(f"train.selection_metric={metric!r} is not produced by task {task!r}: choose one of "
                        f"{list(produced)}")
    if patience and train.num_steps and train.eval_every >= train.num_steps:
        raise UserError(f"train.early_stopping_patience={patience} needs evaluations before the end, but "
                        f"train.eval_every={train.eval_every} >= train.num_steps={train.num_steps}: lower "
                        "train.eval_every or set train.early_stopping_patience=0")
    if config.data.get("test_split") and config.data.test_split == config.data.eval_split:
        raise UserError(f"data.test_split={config.data.test_split!r} is also data.eval_split, on which every "
                        "choice is made: use separate splits (e.g. validation and test)")


@dataclasses.dataclass
class EarlyStopping:
    metric: str  # train.selection_metric
    patience: int  # 0: never stop early
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    best_metrics: dict = dataclasses.field(default_factory=dict)  # the validation metrics at best_step
    evals_since_best: int = 0  # evaluations since the last one that beat `reference` by more than min_delta
    stopped: bool = False  # ended by early stopping: a resumed run trains no further
    # An evaluation resets the patience count only when it beats `reference` (the value of the last such
    # evaluation) by more than min_delta: a run creeping down by less has converged and stops. The best
    # checkpoint is still the best value. 0: every improvement counts.
    min_delta: float = 0.0
    reference: Optional[float] = None

    def update(self, step: int, metrics: dict) -> bool:
        """Records an evaluation; returns whether it is a new best (then its step should be saved)."""
        if self.metric not in metrics:
            raise UserError(f"train.selection_metric={self.metric!r} is not among this run's evaluation metrics "
                            f"{sorted(metrics)}: choose one of them")
        value = float(metrics[self.metric])
        reference = self.best_value if self.reference is None else self.reference
        sign = 1.0 if higher_is_better(self.metric) else -1.0
        if math.isfinite(value) and (reference is None or sign * (value - reference) > self.min_delta):
            self.reference, self.evals_since_best = value, 0  # a real improvement: patience starts again
        else:
            self.evals_since_best += 1
            if self.patience and self.evals_since_best >= self.patience:
                self.stopped = True
        if better(value, self.best_value, self.metric):
            self.best_value, self.best_step = value, step
            self.best_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}
            return True
        return False

    def to_json(self) -> dict:
        # min_delta is the config's (train.early_stopping_min_delta); reference is state only when it is set
        stored = {k: v for k, v in dataclasses.asdict(self).items() if k != "min_delta"}
        if not self.min_delta:
            del stored["reference"]  # then it is always best_value
        return stored

    @classmethod
    def from_json(cls, stored: dict, metric: str, patience: int, min_delta: float = 0.0) -> "EarlyStopping":
        if stored.get("metric") != metric:
            raise UserError(f"the checkpoint selects on {stored.get('metric')!r} but train.selection_metric="
                            f"{metric!r}: keep the run's selection metric or start a fresh --workdir")
        return cls(**{**stored, "patience": patience, "min_delta": min_delta})
