"""The pretraining-vs-fine-tuning study's analysis, from stored results only (report.py renders it).

The parts (the config's `study` section names the stages of each):
1. data efficiency: test loss against narrow-data tokens D_F, scratch and fine-tuned, per size;
2. effective data transferred: D_E read off each size's scratch curve, D_T = D_E - D_F, and
   the fit D_T = k D_F^alpha N^beta (transfer.py);
3. one pretrained model on every task with every strategy, and each strategy's share of full
   fine-tuning's gain over the untouched pretrained model;
4. cost against quality: trainable parameters, optimizer state, step time, peak memory,
   time to the best checkpoint, and the Pareto front;
5. statistics: means with 95% t-intervals over seeds (gptlab/stats.py), paired differences
   for the comparisons the conclusions rest on, Holm-corrected as one family; the conclusions
   say which held;
6. breadth against depth: what fine-tuning costs the general model (bits per byte on the
   pretraining corpus's validation split, after - before) against what it gains on the task.

The transfer law is fitted twice: least squares on the measured points (the old fit) and a
censored likelihood on every point (transfer.py), with intervals from a bootstrap over seeds.

Choices read validation only: the learning rate of every (arm, size, fraction) is the one the
sweep chose on seed 0's validation (its dynamic `choose` stage; the other seeds ran only at it),
or, for results without a recorded choice, the grid value with the best mean validation
selection metric over seeds; everything reported is the chosen cells' best checkpoint (also
chosen on validation) scored on the test split.
"""
import dataclasses
import math
from typing import Optional

import numpy as np

from gptlab import selection
from gptlab import stats
from gptlab.errors import UserError
from projects.pretrain_vs_finetune import transfer

FRACTION = "data.train_fraction"
PAPER = {"alpha": 0.18, "beta": 0.38}  # Hernandez et al. 2021, text -> Python, their fit of D_T
TASK_METRIC = {"lm": "test_loss", "sft": "test_loss", "classify": "test_accuracy"}  # what comparisons read
TASK_EXTRA = {"classify": ("test_macro_f1",)}  # shown beside it in the tasks table
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # Holm's family-wise error
BOOTSTRAP_REPLICATES = 400  # resamples of the seeds behind the transfer fit
BOOTSTRAP_SEED = 0  # fixed, so the report is reproducible
CLASSIFY_CHANCE = 1 / 8  # classify: 8 packages (gptlab/data/held_out.py PACKAGES)


def compact(line: dict) -> dict:
    """What the report reads of one results.jsonl line (a finished cell and its result.json)."""
    r = line["result"]
    sel = r.get("selection") or {}
    timing, data = r.get("timing") or {}, (r.get("config") or {}).get("data") or {}
    return {
        "cell": line["cell"], "stage": line["stage"], "seed": line["seed"], "factors": line.get("factors") or {},
        "validation": sel.get("validation") or {}, "test": sel.get("test") or {},
        "best_step": sel.get("best_step"), "last_step": sel.get("last_step", r.get("steps")),
        "stopped_early": sel.get("stopped_early"), "hit_budget": sel.get("hit_budget_while_improving"),
        "params": r.get("params") or {}, "optimizer_state_bytes": r.get("optimizer_state_bytes"),
        "train_data_tokens": r.get("train_data_tokens"), "data_examples": r.get("data_examples"),
        "batch_tokens": int(data.get("batch_size") or 0) * int(data.get("seq_len") or 0),
        "wall_time_s": timing.get("wall_time_s"), "peak_rss_mb": timing.get("peak_rss_mb"),
        "tokens_per_sec": timing.get("tokens_per_sec"),
        "commit": (r.get("git") or {}).get("commit"), "dirty": (r.get("git") or {}).get("dirty"),
        "device": r.get("device"),
        # Newer cells only (absent in older results): the breadth measurement and the examples scored on test.
        **({"breadth": r["breadth"]} if r.get("breadth") else {}),
        # A choosing stage's cells (gptlab/sweep `choose`): whether the sweep chose this cell's learning rate
        **({"choice": line["choice"]} if line.get("choice") else {}),
        **({"test_examples": sel.get("test_examples") or r.get("test_examples")}
           if sel.get("test_examples") or r.get("test_examples") else {}),
    }


@dataclasses.dataclass
class Choice:
    """The cells of one arm at one setting after the learning rate is chosen on validation."""
    stage: str
    fraction: Optional[float]
    learning_rate: Optional[float]
    cells: list  # compact records of the chosen learning rate, one per seed
    grid: tuple = ()  # the learning rates it was chosen from
    on_seed: Optional[int] = None  # the seed the sweep chose on (its `choose` stage); None: chosen here on all seeds

    @property
    def at_edge(self) -> bool:
        """A grid of 3+ rates has the chosen one at either end: the best may lie outside it."""
        return len(self.grid) > 2 and self.learning_rate in (min(self.grid), max(self.grid))

    @property
    def lr_text(self) -> str:
        """The chosen rate; "(edge)" at either end of a grid of 3+ rates."""
        return fmt_lr(self.learning_rate) + (" (edge)" if self.at_edge else "")

    def breadth_values(self) -> dict:
        """seed -> after - before bits per byte on the pretraining corpus (the general ability lost)."""
        out = {}
        for c in self.cells:
            b = c.get("breadth") or {}
            before, after = (b.get("before") or {}).get("bits_per_byte"), (b.get("after") or {}).get("bits_per_byte")
            if isinstance(before, (int, float)) and isinstance(after, (int, float)):
                out[c["seed"]] = float(after) - float(before)
        return out

    def values(self, metric: str) -> dict:
        """seed -> the best checkpoint's test `metric` (validation metrics are `eval_*`)."""
        out = {}
        for c in self.cells:
            v = (c["validation"] if metric.startswith("eval_") else c["test"]).get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[c["seed"]] = float(v)
        return out

    def interval(self, metric: str) -> Optional[stats.Interval]:
        values = self.values(metric)
        return stats.t_interval(list(values.values()), CONFIDENCE) if values else None

    def mean_of(self, key: str) -> Optional[float]:
        values = [c[key] for c in self.cells if isinstance(c.get(key), (int, float))]
        return float(np.mean(values)) if values else None


class Study:
    def __init__(self, spec: dict, records: list, provenance: dict):
        if not spec:
            raise UserError("this sweep has no `study` section: run a study config such as "
                            "projects/pretrain_vs_finetune/config.py:small")
        self.spec, self.records, self.provenance = spec, records, provenance
        self.by_stage = {}
        for r in records:
            self.by_stage.setdefault(r["stage"], []).append(r)
        self.select = spec.get("select", "optimizer.learning_rate")
        self.sizes = list(spec["sizes"])
        self.tasks = list(spec["tasks"])
        self._memo = {}

    def _cached(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def pretrain_seeds(self) -> list:
        """The pretraining seeds: the config's `pretrain_seeds`, else the seeds of the pretraining cells."""
        if self.spec.get("pretrain_seeds"):
            return sorted(self.spec["pretrain_seeds"])
        seeds = {c["seed"] for roles in self.spec["sizes"].values() for c in self.by_stage.get(roles["pretrain"], [])}
        return sorted(seeds) or [0]

    def pretrain_seed_of(self, seed: int) -> int:
        """The pretraining seed a fine-tuning seed starts from: seed s uses the (s mod n)-th pretraining seed."""
        seeds = self.pretrain_seeds()
        return seeds[seed % len(seeds)]

    # -- choosing on validation --

    def choose(self, stage: str, selection_metric: str, fraction: Optional[float] = None) -> Optional[Choice]:
        """The stage's cells at `fraction` (None: any), grouped by learning rate; the best on validation wins.

        Where the sweep chose (a `choose` stage: results.jsonl's `choice`), its choice stands: it was made on one
        seed's validation, and only the chosen rate has every seed, so averaging each rate's seeds here would
        compare rates over different seeds. Results without a recorded choice: the best mean over seeds."""
        selection.check_validation_metric(selection_metric, "the study's selection metric")
        cells = [c for c in self.by_stage.get(stage, [])
                 if fraction is None or _same(c["factors"].get(FRACTION, 1.0), fraction)]
        groups = {}
        for c in cells:
            groups.setdefault(c["factors"].get(self.select), []).append(c)
        grid = tuple(sorted(k for k in groups if k is not None))
        chosen = [c for c in cells if (c.get("choice") or {}).get("chosen")]
        if chosen:
            rates = {c["factors"].get(self.select) for c in chosen}
            if len(rates) > 1:
                raise UserError(f"stage {stage}'s results record {len(rates)} chosen learning rates at fraction "
                                f"{fmt_fraction(fraction)}: rebuild results.jsonl with python -m experiments.study "
                                "--report_only --workdir=SWEEP_DIR")
            return Choice(stage, fraction, rates.pop(), sorted(chosen, key=lambda c: c["seed"]), grid,
                          on_seed=chosen[0]["choice"].get("on_seed"))
        scores = {lr: [c["validation"].get(selection_metric) for c in group] for lr, group in groups.items()}
        if not any(isinstance(v, (int, float)) and math.isfinite(v) for values in scores.values() for v in values):
            return None
        lr = selection.choose_on_validation(scores, selection_metric, "the study's selection metric")
        return Choice(stage, fraction, lr, sorted(groups[lr], key=lambda c: c["seed"]), grid)

    # -- part 1: data efficiency --

    def efficiency(self) -> list:
        """[(size, arm, fraction, Choice)] for scratch and fine-tuned, and the zero-shot per size."""
        return self._cached("efficiency", self._efficiency)

    def _efficiency(self) -> list:
        rows = []
        for size, roles in self.spec["sizes"].items():
            for arm in ("scratch", "finetuned"):
                for fraction in self.spec["fractions"]:
                    choice = self.choose(roles[arm], "eval_loss", fraction)
                    if choice is not None:
                        rows.append((size, arm, fraction, choice))
        return rows

    def _grid_note(self) -> str:
        sizes = {len(ch.grid) for *_, ch in self.efficiency()}
        if not sizes:
            return ""
        n = max(sizes)
        on_seed = {ch.on_seed for *_, ch in self.efficiency()} - {None}
        return (f"The learning-rate grid has {n} value{'s' if n != 1 else ''} per arm" +
                (": the chosen rate is always one of its two ends, so a better rate may lie outside it." if n == 2
                 else "; (edge) marks a chosen rate at either end of it." if n > 2 else ".") +
                (f" The rate was chosen on seed {min(on_seed)}'s validation alone, and the other seeds ran only at it "
                 "(the sweep's dynamic stage; DIR/choices.json)." if on_seed else ""))

    def zero_shot(self, size: str) -> Optional[Choice]:
        return self.choose(self.spec["sizes"][size]["zero_shot"], "eval_loss")

    def non_embedding(self, size: str) -> Optional[int]:
        for stage in ("pretrain", "scratch"):
            for c in self.by_stage.get(self.spec["sizes"][size][stage], []):
                if c["params"].get("non_embedding"):
                    return int(c["params"]["non_embedding"])
        return None

    # -- part 2: effective data transferred --

    def transfer_points(self, draw: Optional[list] = None) -> list:
        """[(size, N, fraction, EffectiveData)]: each fine-tuned mean read off its size's mean scratch curve.

        `draw` (a bootstrap resample: seeds, repeats allowed) averages over those seeds instead of all."""
        if draw is None:
            return self._cached("points", lambda: self.transfer_points([]))
        points = []
        rows = self.efficiency()
        for size in self.sizes:
            scratch = [(ch.mean_of("train_data_tokens"), _mean(ch, draw)) for s, arm, _, ch in rows
                       if s == size and arm == "scratch"]
            scratch = [(d, m) for d, m in scratch if d and m is not None]
            if len(scratch) < 2:
                continue
            n = self.non_embedding(size)
            for s, arm, fraction, ch in rows:
                mean = _mean(ch, draw)
                if s != size or arm != "finetuned" or mean is None or not ch.mean_of("train_data_tokens"):
                    continue
                point = transfer.effective_data([d for d, _ in scratch], [l for _, l in scratch],
                                                ch.mean_of("train_data_tokens"), mean)
                points.append((size, n, fraction, point))
        return points

    def censored_fit(self, points, keep_nonpositive: bool = False) -> tuple:
        """(CensoredFit or None, {what was done with which points: count}, why not).

        The report's fit leaves out points that say D_T <= 0 and counts them: a law of positive D_T has no
        room for them, and entering them as bounds at any c > 0 makes the fit depend on the arbitrary log c
        (keep_nonpositive=True: at one token, shown beside it as the sensitivity check)."""
        chosen = [(p, n) for _, n, _, p in points if n and (keep_nonpositive or not _nonpositive(p))]
        dropped = len(points) - len(chosen)
        observations, notes = transfer.censored_observations([p for p, _ in chosen], [n for _, n in chosen])
        if dropped:
            notes = {**notes, "with D_T <= 0 left out": dropped}
        try:
            return transfer.fit_censored_transfer_law(observations), notes, None
        except ValueError as e:
            return None, notes, str(e)

    def bootstrap(self) -> dict:
        """Percentile intervals of both fits' exponents and of every D_T over seed resamples (cached)."""
        return self._cached("bootstrap", self._bootstrap)

    def _bootstrap(self) -> dict:
        """Each replicate draws pretraining seeds with replacement and, within each, its fine-tuning seeds; the same
        draw averages the scratch curves and the fine-tuned points (the seed fixes both cells' data order), and the
        learning rates stay those chosen (by the sweep on seed 0, or here on all seeds)."""
        seeds = sorted({c["seed"] for *_, ch in self.efficiency() for c in ch.cells})
        clusters = {}
        for s in seeds:
            clusters.setdefault(self.pretrain_seed_of(s), []).append(s)
        groups = list(clusters.values())
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        draws = {"censored": [], "ols": []}
        d_t, failed, done = {}, {"censored": 0, "ols": 0}, {}
        for _ in range(BOOTSTRAP_REPLICATES if len(seeds) > 1 else 0):
            draw = [s for g in rng.choice(len(groups), len(groups)) for s in rng.choice(groups[g], len(groups[g]))]
            key = tuple(sorted(int(s) for s in draw))  # the means depend only on the multiset: fit each once
            if key not in done:
                points = self.transfer_points(list(key))
                done[key] = (points, self.censored_fit(points, keep_nonpositive=False)[0], self.transfer_fit(points)[0])
            points, fit, ols = done[key]
            for size, _, fraction, p in points:
                if p.censored is None:
                    d_t.setdefault((size, fraction), []).append(p.transferred_tokens)
            for key, f in (("censored", fit), ("ols", ols)):
                if f is None:
                    failed[key] += 1
                else:
                    draws[key].append((f.alpha, f.beta))
        out = {"replicates": BOOTSTRAP_REPLICATES if len(seeds) > 1 else 0, "failed": failed,
               "clusters": len(groups), "seeds": len(seeds), "distinct": len(done),
               "d_t": {k: transfer.percentile_interval(v, CONFIDENCE) for k, v in d_t.items()},
               "d_t_measured": {k: len(v) for k, v in d_t.items()}}
        for key, values in draws.items():
            out[key] = {name: transfer.percentile_interval([v[i] for v in values], CONFIDENCE)
                        for i, name in enumerate(("alpha", "beta"))}
        return out

    def transfer_fit(self, points) -> tuple:
        """(TransferFit or None, why not) over the uncensored points with D_T > 0."""
        usable = [(p.fine_tuned_tokens, n, p.transferred_tokens) for _, n, _, p in points
                  if p.censored is None and p.transferred_tokens and p.transferred_tokens > 0 and n]
        if not usable:
            censored = sum(1 for *_, p in points if p.censored == "above")
            return None, (f"no fine-tuned point has a D_E inside its size's scratch curve ({censored} of {len(points)} "
                          "reach a lower test loss than every scratch run of their size, so only D_E > the largest "
                          "scratch D_F is known)")
        try:
            return transfer.fit_transfer_law(*zip(*usable)), None
        except ValueError as e:
            return None, str(e)

    # -- part 3: every task, every strategy --

    def task_table(self) -> dict:
        """{task: {"zero": Choice, "arms": {label: Choice}}} at the task size, fraction 1."""
        out = {}
        for task, roles in self.spec["tasks"].items():
            metric = roles["selection_metric"]
            arms = {}
            for label, stage in roles["arms"].items():
                choice = self.choose(stage, metric, 1.0 if stage in self._fraction_stages() else None)
                if choice is not None:
                    arms[label] = choice
            out[task] = {"zero": self.choose(roles["zero_shot"], metric), "arms": arms}
        return out

    def _fraction_stages(self) -> set:
        return {roles["finetuned"] for roles in self.spec["sizes"].values()} | \
               {roles["scratch"] for roles in self.spec["sizes"].values()}

    @staticmethod
    def gain_share(arm: Choice, full: Choice, zero: Choice, metric: str) -> Optional[stats.Interval]:
        """Per seed: (arm - untouched) / (full - untouched); mean and t-interval over seeds."""
        z = zero.interval(metric) if zero else None
        a, f = arm.values(metric), full.values(metric)
        seeds = sorted(set(a) & set(f))
        if z is None or not seeds:
            return None
        shares = [(a[s] - z.mean) / (f[s] - z.mean) for s in seeds if f[s] != z.mean]
        return stats.t_interval(shares, CONFIDENCE) if shares else None

    # -- part 5: paired differences --

    def tested_comparisons(self) -> list:
        """[(family, what, Interval, metric, p, Holm-adjusted p, holds after Holm)] over every paired comparison."""
        def make():
            rows = self.comparisons()
            p = [stats.paired_p_value(*self._pair_values(family, what, metric)) for family, what, _, metric in rows]
            adjusted, reject = stats.holm(p, ALPHA)
            return [(*row, pv, a, r) for row, pv, a, r in zip(rows, p, adjusted, reject)]
        return self._cached("tested", make)

    def _pair_values(self, family: str, what: str, metric: str) -> tuple:
        return self._memo.get(("pair", family, what), ({}, {}))

    def comparisons(self) -> list:
        """[(family, what, a - b Interval, metric)] for the comparisons the conclusions rest on."""
        out = []
        rows = {(s, arm, f): ch for s, arm, f, ch in self.efficiency()}
        for size in self.sizes:
            for fraction in self.spec["fractions"]:
                ft, sc = rows.get((size, "finetuned", fraction)), rows.get((size, "scratch", fraction))
                if ft and sc and set(ft.values("test_loss")) & set(sc.values("test_loss")):
                    self._memo[("pair", "fine-tuned vs scratch", f"{size}, fraction {fmt_fraction(fraction)}")] = (
                        ft.values("test_loss"), sc.values("test_loss"))
                    out.append(("fine-tuned vs scratch", f"{size}, fraction {fmt_fraction(fraction)}",
                                stats.paired_difference(ft.values("test_loss"), sc.values("test_loss"), CONFIDENCE),
                                "test_loss"))
        table = self.task_table()
        loras = [label for label in next(iter(self.spec["tasks"].values()))["arms"] if label.startswith("lora")]
        for family, pairs in (("full vs LoRA", [("full", lora) for lora in loras]),
                              ("LoRA vs head", [(lora, "head") for lora in loras])):
            for task in self.tasks:
                metric = TASK_METRIC[task]
                arms = table[task]["arms"]
                for a, b in pairs:
                    if a in arms and b in arms and set(arms[a].values(metric)) & set(arms[b].values(metric)):
                        self._memo[("pair", family, f"{a} - {b}, {task}")] = (arms[a].values(metric),
                                                                             arms[b].values(metric))
                        out.append((family, f"{a} - {b}, {task}",
                                    stats.paired_difference(arms[a].values(metric), arms[b].values(metric),
                                                               CONFIDENCE), metric))
        return out

    # -- part 6: breadth against depth --

    def depth_breadth(self) -> list:
        """[(strategy, task, size, fraction, depth Interval, forgetting Interval, tokens scored)] for every fine-tuning
        arm whose cells measured breadth. Depth: the test gain over the untouched pretrained model (loss: zero - arm;
        accuracy: arm - zero), per seed; forgetting: after - before bits per byte on the pretraining corpus."""
        rows = []
        arms = [("full", "lm", size, fraction, ch) for size, arm, fraction, ch in self.efficiency()
                if arm == "finetuned"]
        table = self.task_table()
        for task in self.tasks:
            for label, ch in table[task]["arms"].items():
                if not (task == "lm" and ch.stage in {r["finetuned"] for r in self.spec["sizes"].values()}):
                    arms.append((label, task, self.spec["task_size"], None, ch))
        for label, task, size, fraction, ch in arms:
            forgetting = ch.breadth_values()
            if not forgetting:
                continue
            metric = TASK_METRIC[task]
            zero = self.zero_shot(size) if task == "lm" else table[task]["zero"]
            z = zero.interval(metric) if zero else None
            sign = 1.0 if selection.higher_is_better(metric) else -1.0
            depth = ({s: sign * (v - z.mean) for s, v in ch.values(metric).items()} if z else {})
            tokens = [(c.get("breadth") or {}).get("tokens") for c in ch.cells]
            tokens = [t for t in tokens if isinstance(t, (int, float))]
            rows.append((label, task, size, fraction,
                         stats.t_interval(list(depth.values()), CONFIDENCE) if depth else None,
                         stats.t_interval(list(forgetting.values()), CONFIDENCE), int(max(tokens)) if tokens else None))
        return rows

    def capped_cells(self) -> tuple:
        """([(stage, fraction, learning rate, [seeds])] of cells that ended at their step cap while still improving,
        count, cells counted): pretraining runs a fixed schedule and is not counted."""
        pretrain = {roles["pretrain"] for roles in self.spec["sizes"].values()}
        counted = [c for c in self.records if c["stage"] not in pretrain]
        groups = {}
        for c in counted:
            if c.get("hit_budget"):
                key = (c["stage"], c["factors"].get(FRACTION), c["factors"].get(self.select))
                groups.setdefault(key, []).append(c["seed"])
        rows = [(stage, f, lr, sorted(seeds)) for (stage, f, lr), seeds in groups.items()]
        return rows, sum(len(r[3]) for r in rows), len(counted)

    def leak_warnings(self) -> list:
        """Stages whose validation loss is under half their test loss: validation may overlap training."""
        out = []
        for stage, cells in self.by_stage.items():
            pairs = [(c["validation"].get("eval_loss"), c["test"].get("test_loss")) for c in cells]
            pairs = [(v, t) for v, t in pairs if isinstance(v, (int, float)) and isinstance(t, (int, float))]
            low = [(v, t) for v, t in pairs if v < 0.5 * t]
            if low:
                v, t = min(low)
                out.append(f"`{stage}`: {len(low)} of {len(pairs)} cells have a validation loss under half their test "
                           f"loss (lowest {v:.3f} against {t:.3f}): the validation split may overlap what they "
                           "train on, and choices made on it are suspect.")
        return out

    # -- output --


    def cost_rows(self) -> list:
        """[(label, lm test loss, [params, opt bytes, ms/step, RSS, s to best, pareto])] at the task size."""
        table = self.task_table().get("lm", {"arms": {}})
        size = self.spec["task_size"]
        arms = dict(table["arms"])
        scratch = self.choose(self.spec["sizes"][size]["scratch"], "eval_loss", 1.0)
        if scratch:
            arms = {f"scratch {size}": scratch, **arms}
        points = {}
        for label, ch in arms.items():
            i = ch.interval("test_loss")
            trainable = ch.cells[0]["params"].get("trainable") if ch.cells else None
            if i and trainable:
                points[label] = (trainable, i.mean)
        front = pareto(points)
        rows = []
        for label, ch in arms.items():
            i = ch.interval("test_loss")
            c0 = ch.cells[0] if ch.cells else {}
            step_ms = [1000 * c["batch_tokens"] / c["tokens_per_sec"] for c in ch.cells
                       if c.get("tokens_per_sec") and c.get("batch_tokens")]
            to_best = [c["wall_time_s"] * c["best_step"] / c["last_step"] for c in ch.cells
                       if c.get("wall_time_s") and c.get("last_step") and c.get("best_step") is not None]
            rows.append((label, fmt_interval(i), [fmt_int(c0.get("params", {}).get("trainable")),
                                         fmt_int(c0.get("optimizer_state_bytes")),
                                         f"{np.mean(step_ms):.1f}" if step_ms else "—",
                                         f"{ch.mean_of('peak_rss_mb'):.0f}" if ch.mean_of("peak_rss_mb") else "—",
                                         f"{np.mean(to_best):.1f}" if to_best else "—",
                                         "yes" if label in front else "no"]))
        return rows


    # -- figures --


    # -- documents --


    # What the pretraining and narrow data were, for studies recorded before study.json said (pretraining on the
    # rest of the library's code, the narrow lm data all held-out packages).
    _OLD_CORPORA = dict(broad="Python code (the standard library)", broad_short="Python code",
                        narrow="the held-out packages (gptlab/data/held_out.py)",
                        narrow_short="held-out packages' training split")


# -- helpers ----------------------------------------------------------------------------------


def _mean(choice: Choice, draw: list) -> Optional[float]:
    """The mean test loss over all seeds (draw empty: the interval's mean) or over a bootstrap draw of seeds."""
    if not draw:
        interval = choice.interval("test_loss")
        return interval.mean if interval else None
    values = choice.values("test_loss")
    drawn = [values[s] for s in draw if s in values]
    return float(np.mean(drawn)) if drawn else None


def _nonpositive(p) -> bool:
    """A point that says D_T <= 0: measured so, or worse than every scratch run with as much data."""
    if p.censored is None:
        return p.transferred_tokens <= 0
    return p.censored == "below" and p.bound <= p.fine_tuned_tokens


def pareto(points: dict) -> set:
    """Labels of `points` ({label: (cost, loss)}) that no other point beats on both (lower is better)."""
    front = set()
    for label, (cost, loss) in points.items():
        if not any(c <= cost and l <= loss and (c, l) != (cost, loss) for other, (c, l) in points.items()
                   if other != label):
            front.add(label)
    return front


def _same(a, b) -> bool:
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)


def fmt_fraction(fraction) -> str:
    if fraction is None:
        return "—"
    inverse = 1 / fraction
    # Fractions are stored rounded (1/243 as 0.00411523): name them by the whole number they invert to.
    whole = math.isclose(inverse, round(inverse), rel_tol=1e-4)
    return "1" if fraction == 1 else (f"1/{round(inverse)}" if whole else f"{fraction:g}")


# -- reading and writing ---------------------------------------------------------------------------


def fmt_int(value) -> str:
    return "—" if value is None else f"{int(round(value)):,}"


def fmt_lr(value) -> str:
    return "—" if value is None else f"{value:.2g}"


def fmt_interval(interval, digits: int = 4) -> str:
    if interval is None:
        return "—"
    if not math.isfinite(interval.half_width):
        return f"{interval.mean:.{digits}f} (1 seed)"
    return f"{interval.mean:.{digits}f} ± {interval.half_width:.{digits}f}"
