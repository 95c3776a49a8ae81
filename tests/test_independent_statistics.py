"""Selection, early stopping and the study's statistics, checked against hand computation or scipy.

Pure Python and numpy (no model), so dev/mutation.sh scores these modules in seconds a mutant.
The model-side numbers (LoRA, the loss and its masks, task metrics) are in test_independent_answers.py.
"""
import math

import numpy as np
import pytest
from ml_collections import config_dict
from scipy import stats

from gptlab import report, selection
from gptlab import stats as intervals
from projects.pretrain_vs_finetune import analysis as study_lib
from projects.pretrain_vs_finetune import transfer
from gptlab.errors import UserError


# -- selection and early stopping ----------------------------------------------------------------


def test_better_and_the_direction_of_each_metric():
    for metric in ("eval_accuracy", "eval_macro_f1", "exact_match", "parse_rate"):
        assert selection.higher_is_better(metric) and selection.mode(metric) == "max"
        assert selection.better(0.6, 0.5, metric) and not selection.better(0.5, 0.5, metric)
    for metric in ("eval_loss", "eval_perplexity"):
        assert not selection.higher_is_better(metric) and selection.mode(metric) == "min"
        assert selection.better(0.4, 0.5, metric) and not selection.better(0.5, 0.5, metric)
    assert selection.better(3.0, None, "eval_loss") and not selection.better(math.nan, None, "eval_loss")
    assert not selection.better(math.inf, None, "eval_loss")


def test_early_stopping_by_hand():
    stop = selection.EarlyStopping("eval_loss", patience=2)
    assert stop.update(10, {"eval_loss": 3.0, "eval_perplexity": np.float32(20.0), "note": "x"})
    assert (stop.best_value, stop.best_step, stop.best_metrics) == (3.0, 10, {"eval_loss": 3.0, "eval_perplexity": 20.0})
    assert not stop.update(20, {"eval_loss": 3.0}) and stop.evals_since_best == 1 and not stop.stopped
    assert stop.update(30, {"eval_loss": 2.5}) and stop.evals_since_best == 0 and stop.best_step == 30
    assert not stop.update(40, {"eval_loss": 2.6}) and not stop.stopped
    assert not stop.update(50, {"eval_loss": 2.7}) and stop.stopped and stop.best_step == 30
    saved = stop.to_json()
    assert saved == {"metric": "eval_loss", "patience": 2, "best_value": 2.5, "best_step": 30,
                     "best_metrics": {"eval_loss": 2.5}, "evals_since_best": 2, "stopped": True}
    resumed = selection.EarlyStopping.from_json(saved, "eval_loss", 5)
    assert resumed.patience == 5 and resumed.best_step == 30 and resumed.stopped
    with pytest.raises(UserError, match="selects on 'eval_loss' but train.selection_metric='eval_accuracy'"):
        selection.EarlyStopping.from_json(saved, "eval_accuracy", 2)
    never = selection.EarlyStopping("eval_accuracy", patience=0)
    assert never.update(1, {"eval_accuracy": 0.5})
    for step in range(2, 10):
        assert not never.update(step, {"eval_accuracy": 0.4})
    assert not never.stopped and never.evals_since_best == 8
    assert never.update(10, {"eval_accuracy": 0.6}) and never.best_value == 0.6
    with pytest.raises(UserError, match="not among this run's evaluation metrics"):
        never.update(11, {"eval_loss": 1.0})
    one = selection.EarlyStopping("eval_loss", patience=1)
    one.update(1, {"eval_loss": 1.0})
    assert not one.update(2, {"eval_loss": 1.0}) and one.stopped


def selection_config(task="lm", patience=0, metric="eval_loss", eval_every=10, num_steps=100, test_split=None):
    return config_dict.ConfigDict({
        "train": {"early_stopping_patience": patience, "selection_metric": metric, "eval_every": eval_every,
                  "num_steps": num_steps},
        "data": {"eval_split": "validation", "test_split": test_split},
        "finetune": {"task": task}})


def test_selection_settings_are_checked():
    selection.check_config(selection_config())
    selection.check_config(selection_config("classify", 3, "eval_macro_f1", test_split="test"))
    selection.check_config(selection_config(patience=1, eval_every=99, num_steps=100))
    selection.check_config(selection_config(patience=1, eval_every=10, num_steps=0))
    # A config without the selection fields: eval_loss, no early stopping (so evaluating only at the end is fine).
    selection.check_config(config_dict.ConfigDict({"train": {"eval_every": 100, "num_steps": 100},
                                                   "data": {"eval_split": "validation"}}))
    for kwargs, message in (
            (dict(patience=-1), "train.early_stopping_patience=-1 must be >= 0 (evaluations without improvement "
                                "before stopping; 0: off)"),
            (dict(metric="eval_accuracy"), "train.selection_metric='eval_accuracy' is not produced by task 'lm': "
                                           "choose one of ['eval_loss', 'eval_perplexity']"),
            (dict(task="sft", metric="exact_match"), "train.selection_metric='exact_match' is not produced by task "
                                                     "'sft': choose one of ['eval_loss', 'eval_perplexity']"),
            (dict(task="dpo", metric="eval_perplexity"), "train.selection_metric='eval_perplexity' is not produced "
                                                         "by task 'dpo': choose one of ['eval_loss']"),
            (dict(patience=1, eval_every=100, num_steps=100),
             "train.early_stopping_patience=1 needs evaluations before the end, but train.eval_every=100 >= "
             "train.num_steps=100: lower train.eval_every or set train.early_stopping_patience=0"),
            (dict(test_split="validation"), "data.test_split='validation' is also data.eval_split, on which every "
                                            "choice is made: use separate splits (e.g. validation and test)")):
        with pytest.raises(UserError) as error:
            selection.check_config(selection_config(**kwargs))
        assert str(error.value) == message
    assert selection.task_of(selection_config("classify")) == "classify"
    assert selection.task_of(config_dict.ConfigDict({"train": {}})) == "lm"
    assert selection.task_of(config_dict.ConfigDict({"finetune": {"task": ""}})) == "lm"
    assert selection.task_of(object()) == "lm"  # anything without .get: a plain language model


def test_report_chooses_the_best_mean_validation_value():
    def result(val):
        return {"selection": {"validation": {"eval_loss": val, "eval_accuracy": 1 - val}}}

    candidates = {1e-3: [result(2.0), result(2.2)], 3e-3: [result(2.05), result(2.05)], 1e-2: [{"eval_loss": None}]}
    assert report.choose(candidates, "eval_loss") == 3e-3  # mean 2.05 < 2.1
    assert report.choose(candidates, "eval_accuracy") == 3e-3
    assert report.choose({1: [{"eval_loss": 1.5}], 2: [result(1.6)]}, "eval_loss") == 1  # an older result: its final
    assert report.choose({1: [{}]}, "eval_loss") is None
    with pytest.raises(UserError, match="only ever reported"):
        report.choose(candidates, "test_loss")
    assert report.metric_value({"selection": {"test": {"test_loss": 1.5}}, "test_loss": 9}, "test_loss") == 1.5
    assert report.metric_value({"test_loss": 9}, "test_loss") is None
    assert report.metric_value({"eval_loss": 2}, "eval_loss") == 2
    assert report.mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, float(np.std([1, 2, 4], ddof=1))))
    assert report.mean_std([2.0]) == (2.0, None) and report.mean_std([]) == (None, None)
    assert report.mean_std([1.0, 2.0]) == pytest.approx((1.5, math.sqrt(0.5)))


# -- the study's statistics ----------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_and_paired_difference_against_scipy(confidence):
    values = [2.31, 2.35, 2.29, 2.40, 2.33]
    interval = intervals.t_interval(values, confidence)
    low, high = stats.t.interval(confidence, df=4, loc=np.mean(values), scale=stats.sem(values))
    assert (interval.mean, interval.low, interval.high) == pytest.approx((np.mean(values), low, high), rel=1e-12)
    assert interval.n == 5 and interval.confidence == confidence
    assert interval.half_width == pytest.approx((high - low) / 2)
    assert interval.excludes(0.0) and interval.excludes(3.0) and not interval.excludes(2.33)
    a, b = {0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 1.0, 7: 0.0}
    diff = intervals.paired_difference(a, b, confidence)
    expected = stats.ttest_rel([1.0, 2.0, 4.0], [0.5, 1.0, 1.0]).confidence_interval(confidence)
    assert (diff.low, diff.high, diff.mean, diff.n) == pytest.approx((expected.low, expected.high, 1.5, 3))
    with pytest.raises(ValueError, match="non-empty"):
        intervals.t_interval(np.ones((2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        intervals.t_interval([1.0, math.inf])
    single = intervals.t_interval([4.0], confidence)
    assert (single.mean, single.low, single.high, single.n, single.confidence) == (4.0, -math.inf, math.inf, 1,
                                                                                   confidence)


def test_effective_data_by_hand_on_a_three_point_curve():
    d, loss = [1000.0, 4000.0, 16000.0], [4.0, 3.0, 2.0]
    point = transfer.effective_data(d, loss, 500.0, 2.5)
    # Between (4000, 3) and (16000, 2) in log-log: log D = log 4000 + frac * log 4, frac = log(3/2.5) / log(3/2).
    frac = math.log(3 / 2.5) / math.log(3 / 2)
    assert point.effective_tokens == pytest.approx(4000 * 4 ** frac, rel=1e-12)
    assert point.transferred_tokens == pytest.approx(4000 * 4 ** frac - 500, rel=1e-12)
    assert (point.fine_tuned_tokens, point.loss, point.censored, point.bound) == (500.0, 2.5, None, None)
    assert transfer.effective_data(d, loss, 500.0, 3.0).effective_tokens == 4000.0  # exactly a scratch point
    assert transfer.effective_data(d, loss, 500.0, 4.0).effective_tokens == 1000.0
    assert transfer.effective_data(d, loss, 500.0, 2.0).effective_tokens == 16000.0
    above = transfer.effective_data(d, loss, 500.0, 1.9)
    assert (above.censored, above.bound, above.effective_tokens, above.transferred_tokens) == ("above", 16000.0,
                                                                                               None, None)
    below = transfer.effective_data(d, loss, 500.0, 4.1)
    assert (below.censored, below.bound) == ("below", 1000.0)
    # Unsorted input, a rise (noise) read through the running minimum: its plateau's first point.
    d2, l2 = transfer.scratch_envelope([16000.0, 1000.0, 4000.0, 8000.0], [2.0, 4.0, 3.0, 3.5])
    assert d2.tolist() == [1000.0, 4000.0, 8000.0, 16000.0] and l2.tolist() == [4.0, 3.0, 3.0, 2.0]
    assert transfer.effective_data([16000.0, 1000.0, 4000.0, 8000.0], [2.0, 4.0, 3.0, 3.5], 1.0,
                                   3.0).effective_tokens == 4000.0
    two = "the scratch curve needs at least two (tokens, loss) points"
    positive = "scratch tokens and losses must be positive (they are read in log space)"
    for tokens, losses, message in (([1.0], [1.0], two), ([1.0, 2.0], [1.0], two), ([[1.0, 2.0]], [[1.0, 2.0]], two),
                                    ([0.0, 2.0], [1.0, 1.0], positive), ([1.0, 2.0], [1.0, 0.0], positive),
                                    ([1.0, 1.0], [2.0, 1.0], "the scratch curve has two points with the same token "
                                                             "count: average seeds first")):
        with pytest.raises(ValueError) as error:
            transfer.scratch_envelope(tokens, losses)
        assert str(error.value) == message


def test_transfer_fit_against_the_normal_equations_and_scipy_t():
    rng = np.random.default_rng(0)
    d_f = np.array([1e3, 3e3, 1e4, 3e4, 1e3, 3e3, 1e4, 3e4])
    n = np.array([1e5] * 4 + [1e6] * 4)
    d_t = 7.0 * d_f ** 0.6 * n ** 0.3 * np.exp(rng.normal(0, 0.1, 8))
    fit = transfer.fit_transfer_law(d_f, n, d_t, confidence=0.9)
    x = np.column_stack([np.ones(8), np.log(d_f), np.log(n)])
    y = np.log(d_t)
    coef = np.linalg.solve(x.T @ x, x.T @ y)
    residual = y - x @ coef
    cov = residual @ residual / 5 * np.linalg.inv(x.T @ x)
    se = np.sqrt(np.diag(cov))
    t = stats.t.ppf(0.95, 5)
    assert (fit.k, fit.alpha, fit.beta) == pytest.approx((math.exp(coef[0]), coef[1], coef[2]), rel=1e-9)
    assert (fit.alpha_se, fit.beta_se) == pytest.approx((se[1], se[2]), rel=1e-9)
    assert fit.alpha_interval == pytest.approx((coef[1] - t * se[1], coef[1] + t * se[1]), rel=1e-9)
    assert fit.beta_interval == pytest.approx((coef[2] - t * se[2], coef[2] + t * se[2]), rel=1e-9)
    r2 = 1 - residual @ residual / ((y - y.mean()) ** 2).sum()
    assert fit.n == 8 and fit.r_squared == pytest.approx(r2, rel=1e-9)
    assert fit.predict(2e3, 1e5) == pytest.approx(math.exp(coef[0]) * 2e3 ** coef[1] * 1e5 ** coef[2], rel=1e-9)
    with pytest.raises(ValueError, match="equal-length"):
        transfer.fit_transfer_law(d_f[:3], n, d_t)
    with pytest.raises(ValueError, match="at least 4 points"):
        transfer.fit_transfer_law(d_f[[0, 1, 4]], n[[0, 1, 4]], d_t[[0, 1, 4]])
    four = transfer.fit_transfer_law(d_f[[0, 1, 4, 5]], n[[0, 1, 4, 5]], d_t[[0, 1, 4, 5]])
    assert four.n == 4 and math.isfinite(four.alpha_interval[0])
    # Any positive values fit, below 1 too (they are logarithms' arguments, not counts).
    small = transfer.fit_transfer_law([0.5, 1.0, 0.5, 1.0, 2.0], [1.0, 1.0, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4, 0.9])
    assert small.n == 5


def test_gain_share_and_pareto_by_hand():
    def choice(values, metric="test_acc"):
        return study_lib.Choice("s", 1.0, 1e-3, [{"seed": s, "test": {metric: v}, "validation": {}}
                                                 for s, v in values.items()])

    zero = choice({0: 0.2})
    share = study_lib.Study.gain_share(choice({0: 0.5, 1: 0.6, 2: 0.4, 3: 0.9}), choice({0: 0.8, 1: 0.7, 2: 0.6}), zero,
                                       "test_acc")
    expected = [(0.5 - 0.2) / (0.8 - 0.2), (0.6 - 0.2) / (0.7 - 0.2), (0.4 - 0.2) / (0.6 - 0.2)]
    assert share.n == 3 and share.mean == pytest.approx(np.mean(expected))
    assert share.low == pytest.approx(stats.t.interval(0.95, 2, np.mean(expected), stats.sem(expected))[0])
    # A seed where full fine-tuning gained nothing has no share; none at all: no interval.
    assert study_lib.Study.gain_share(choice({0: 0.5, 1: 0.6}), choice({0: 0.2, 1: 0.7}), zero, "test_acc").n == 1
    assert study_lib.Study.gain_share(choice({0: 0.5}), choice({0: 0.2}), zero, "test_acc") is None
    assert study_lib.Study.gain_share(choice({0: 0.5}), choice({1: 0.8}), zero, "test_acc") is None
    assert study_lib.Study.gain_share(choice({0: 0.5}), choice({0: 0.8}), None, "test_acc") is None
    values = choice({0: 0.5, 1: math.nan, 2: 0.7}).values("test_acc")
    assert values == {0: 0.5, 2: 0.7}
    assert choice({0: math.nan}).interval("test_acc") is None  # no finite value: no interval
    both = study_lib.Choice("s", 1.0, 1e-3, [{"seed": 3, "test": {"eval_loss": 9.0, "test_loss": 1.0},
                                              "validation": {"eval_loss": 2.0, "test_loss": 8.0}}])
    assert both.values("eval_loss") == {3: 2.0} and both.values("test_loss") == {3: 1.0}  # eval_*: validation
    assert choice({0: 0.5, 1: 0.7}).interval("test_acc").mean == pytest.approx(0.6)
    assert study_lib.pareto({"a": (1, 3.0), "b": (2, 2.0), "c": (2, 2.0), "d": (3, 2.0), "e": (1, 3.5)}) == {"a", "b",
                                                                                                          "c"}


@pytest.mark.parametrize("call, message", [
    (lambda: intervals.t_interval([]), "t_interval needs a non-empty list of numbers, got []"),
    (lambda: intervals.t_interval([1.0, math.nan]), "t_interval got a non-finite value: [1.0, nan]"),
    (lambda: intervals.paired_difference({0: 1.0, 2: 1.0}, {1: 1.0}), "no common seeds to pair: [0, 2] vs [1]"),
    (lambda: transfer.fit_transfer_law([1.0, 2.0], [1.0], [1.0, 2.0]), "D_F, N and D_T must be equal-length lists"),
    (lambda: transfer.fit_transfer_law([[1.0]], [[1.0]], [[1.0]]), "D_F, N and D_T must be equal-length lists"),
    (lambda: transfer.fit_transfer_law([1.0] * 4, [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, -1.0, 1.0]),
     "the transfer fit takes only positive D_F, N and D_T (drop censored and negative points)"),
    (lambda: transfer.fit_transfer_law([1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0], [1.0] * 4),
     "the transfer fit takes only positive D_F, N and D_T (drop censored and negative points)"),
    (lambda: transfer.fit_transfer_law([1.0] * 4, [1.0, 1.0, 2.0, 2.0], [1.0, 0.0, 1.0, 1.0]),
     "the transfer fit takes only positive D_F, N and D_T (drop censored and negative points)"),
    (lambda: transfer.fit_transfer_law([1.0] * 4, [1.0, 0.0, 2.0, 2.0], [1.0] * 4),
     "the transfer fit takes only positive D_F, N and D_T (drop censored and negative points)"),
    (lambda: transfer.fit_transfer_law([1.0, 2.0, 3.0, 4.0], [5.0] * 4, [1.0] * 4),
     "the transfer fit needs at least two model sizes to determine beta"),
    (lambda: transfer.fit_transfer_law([1.0, 2.0, 3.0], [1.0, 2.0, 2.0], [1.0] * 3),
     "the transfer fit needs at least 4 points (3 coefficients), got 3"),
])
def test_statistics_refuse_what_they_cannot_compute_saying_why(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_study_chooses_the_learning_rate_by_hand():
    def cell(stage, lr, seed, val, fraction=None, metric="eval_loss"):
        factors = {"optimizer.learning_rate": lr, **({"data.train_fraction": fraction} if fraction else {})}
        return {"stage": stage, "seed": seed, "factors": factors, "validation": {metric: val}, "test": {}}

    records = [cell("s", 3e-3, 0, 2.1), cell("s", 1e-3, 0, 2.0), cell("s", 1e-3, 1, math.nan),
               cell("s", 1e-2, 0, 2.3, fraction=0.5), cell("s", 1e-2, 1, None),
               cell("t", 1e-3, 0, 1.5), cell("t", 2e-3, 0, 1.5),  # a tie: the smaller rate
               cell("a", 1e-3, 0, 0.6, metric="eval_accuracy"), cell("a", 2e-3, 0, 0.7, metric="eval_accuracy")]
    study = study_lib.Study({"sizes": {}, "tasks": {}}, records, {})
    choice = study.choose("s", "eval_loss", 1.0)  # cells without a fraction are the full data
    assert (choice.learning_rate, [c["seed"] for c in choice.cells]) == (1e-3, [0, 1])
    assert choice.grid == (1e-3, 3e-3, 1e-2)  # the unscored 1e-2 (no finite value) is still part of the grid
    assert (choice.stage, choice.fraction) == ("s", 1.0)
    # A cell without the selected factor ties with a rate: the rate wins the tie (selection.choose_on_validation).
    untuned = {"stage": "u", "seed": 0, "factors": {}, "validation": {"eval_loss": 1.0}, "test": {}}
    tie = study_lib.Study({"sizes": {}, "tasks": {}}, [untuned, cell("u", 0.5, 0, 1.0)], {})
    assert tie.choose("u", "eval_loss").learning_rate == 0.5
    assert study.choose("s", "eval_loss", 0.5).learning_rate == 1e-2
    assert study.choose("s", "eval_loss").learning_rate == 1e-3 and study.choose("s", "eval_loss").grid == (
        1e-3, 3e-3, 1e-2)
    assert study.choose("t", "eval_loss").learning_rate == 1e-3
    assert study.choose("a", "eval_accuracy").learning_rate == 2e-3
    assert study.choose("missing", "eval_loss") is None
    assert study.choose("s", "eval_loss", 0.25) is None


def test_interval_bounds_and_the_fits_r_squared_at_the_edges():
    interval = intervals.Interval(mean=1.5, low=0.5, high=2.5, n=3)
    assert interval.excludes() and interval.excludes(0.4) and interval.excludes(2.6)  # default: zero
    assert not interval.excludes(0.5) and not interval.excludes(2.5) and not interval.excludes(1.0)  # ends inside
    assert interval.half_width == 1.0 and interval.confidence == 0.95
    # D_T the same everywhere: nothing to explain, R^2 is 1 by convention (not 0/0).
    d_f, n = [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 2.0, 2.0, 3.0]
    flat = transfer.fit_transfer_law(d_f, n, [7.0] * 5)
    assert flat.r_squared == 1.0 and flat.k == pytest.approx(7.0) and flat.alpha == pytest.approx(0.0, abs=1e-9)
    # A small spread (total sum of squares under 1): R^2 is still 1 - residual / total.
    d_t = np.array([1.0, 1.1, 0.95, 1.05, 1.02])
    fit = transfer.fit_transfer_law(d_f, n, d_t)
    x = np.column_stack([np.ones(5), np.log(d_f), np.log(n)])
    y = np.log(d_t)
    residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    total = ((y - y.mean()) ** 2).sum()
    assert total < 1 and fit.r_squared == pytest.approx(1 - residual @ residual / total, rel=1e-9)
