"""The study: how much is pretraining worth, across narrow data, model size and tasks?

    python -m experiments.study --config=projects/pretrain_vs_finetune/config.py:small --workdir=DIR

runs the whole sweep (resuming it when rerun) and writes DIR/study/ (report.md, report.tex,
figures and their CSVs; report.py beside this file). `python -m experiments.sweep` runs the same cells.

Protocol (gptlab/selection.py, gptlab/data/held_out.py): pretraining never reads the
held-out packages; every narrow task draws only from them, split 80/10/10 by top-level
block. Every scratch and fine-tuning cell trains until early stopping on validation ends it
(PATIENCE evaluations without beating the last improvement by more than MIN_DELTA) or its
step budget is reached (result.json's selection.stopped_by says which); scratch's budget is
about 25 epochs of its data at fraction 1, so it ends by early stopping. Every size is
pretrained with each of SEEDS, and fine-tuning seed s starts from pretraining seed s (the
cells' names end in -seedS in both stages). The learning rate is gridded (three values per
arm: LR_FACTORS times the arm's base rate; scratch: SCRATCH_LR_FACTORS) in a dynamic sweep
stage (gptlab/sweep `choose`): seed 0 runs the whole grid, the rate with the best validation
metric is chosen per arm, size and data fraction, and the other seeds run at that rate only
(DIR/choices.json holds every choice; results.jsonl's `choice.chosen` marks the chosen cells).
Every number reported is the chosen cells' best checkpoint scored on the test split (sft and
classify: every example of it; result.json's selection.test_examples counts them). Every
fine-tuning cell also scores the pretraining corpus's validation split before (the pretrained
model) and after (its best checkpoint): result.json's `breadth` (finetune.breadth).

Parts (stage names; each cell a run in DIR/runs/CELL/):
  pretrain_SIZE      once per model size and seed, on the broad corpus (BROAD): English prose,
                     the docstrings of the standard library minus `test/` and the held-out
                     packages. Text -> code, the transfer Hernandez et al. measured.
  scratch_SIZE       a fresh model of that size trained on the narrow lm data only (the
                     held-out package `email`, NARROW), at each data fraction: the curve
                     effective data is read from.
  full_SIZE          pretrain_SIZE fully fine-tuned on the same data: data efficiency and
                     effective data transferred (Hernandez et al. 2021).
  zero_SIZE_TASK     each pretrained model scored without fine-tuning (train.num_steps=0).
  STRATEGY_TASK      TASK_SIZE's pretrained models fine-tuned on every task (lm, sft,
                     classify) with every strategy (full, last_k, head, bitfit, layernorm,
                     LoRA at two ranks), on all of the task's training split; lm reads
                     NARROW's data. full on lm is full_TASK_SIZE at fraction 1, not run twice.

Presets:
  small  a 2-core CPU, in about 75 minutes (an estimate from per-cell timings; see the sizes'
         comment): four sizes of 2 layers and 2 heads, 8, 16, 24 and 48 wide, context 128
         (1.8K-57K non-embedding parameters, 32x), two seeds, data fractions 1/64 to 1 by
         factors of 4, three cells at a time. Left to the GPU preset: models of 10M-127M
         parameters, a third seed, six data fractions.
  tiny   the whole pipeline at test size (1-layer models, two learning rates, 49 cells run and 13
         skipped by the learning-rate choice): 11-17 minutes on 2 busy cores; its numbers mean
         nothing, it checks that everything runs.
  gpu    one GPU: 6-18 layers, 384-768 wide, context 256 (10.6M-127M non-embedding
         parameters), three seeds, the same study at GPU scale.
"""

from configs import finetune as finetune_config
from gptlab import experiment as experiment_lib
from gptlab.data import held_out

# lm (on NARROW: the held-out package email), sft, classify: configs/finetune.py's chat and dpo tasks are not studied
TASKS = ("lm", "sft", "classify")
STRATEGIES = ("full", "last_k", "head", "bitfit", "layernorm")
LORA_RANKS = (4, 16)
FRACTIONS = [2.0 ** -k for k in range(5, -1, -1)]  # 1/32, 1/16, ... 1/2, 1: log-spaced, factor 2
SEEDS = [0, 1]  # pretraining seeds per size; fine-tuning seed s starts from pretraining seed s
# The learning-rate grids, three values per arm, chosen on validation on seed 0 (the dynamic stage). The previous
# study's grid (x1 and x3) had its top value win most fine-tuning points and every lm/sft strategy arm: x9 extends it.
LR_FACTORS = (1.0, 3.0, 9.0)  # times each arm's base rate (configs/finetune.py LEARNING_RATES)
SCRATCH_LEARNING_RATE = 3e-3  # scratch's base rate
# Scratch's grid: 3e-3, 6e-3 and 1.2e-2. The previous study's top value (6e-3) won 12 of its 18 scratch points; a
# pilot (2x48, one seed) had 1.2e-2 far worse than 4e-3 at 1/4 (validation 2.27 against 1.76), so the grid now
# brackets the optimum from both sides at the larger sizes and reaches up for the smaller ones.
SCRATCH_LR_FACTORS = (1.0, 2.0, 4.0)
PATIENCE = 3  # evaluations without a real improvement (below) before a cell stops
# A real improvement beats the last one by more than this (nats of validation loss; accuracy for classify): a cell
# creeping down by less than 0.002 in three evaluations has converged and stops, instead of running to its cap.
MIN_DELTA = 0.002
# The broad corpus: English prose, the docstrings of the standard library minus `test/` and the held-out packages
# (configs/pretrain.py's exclusions; 1.3M training bytes on Python 3.11), so the transfer measured is text -> code
# as in Hernandez et al.; pretraining on the rest of the library's code transferred more than all the narrow code
# was worth, and left effective data transferred unmeasurable.
BROAD = {"data.dataset": "python_stdlib_docstrings"}
# The narrow lm data: the held-out package `email` (configs/finetune.py's lm task), one document per top-level
# block: 322K training bytes on Python 3.11 (157 steps of 2,048 tokens an epoch at fraction 1).
NARROW = {"data.dataset": "python_stdlib_blocks", "data.include": held_out.globs((held_out.NARROW_PACKAGE,)),
          "data.exclude": held_out.STDLIB_TESTS}
# How the report names the two corpora.
CORPORA = dict(broad="English prose, the docstrings of the standard library minus test/ and the held-out packages "
                     "(python_stdlib_docstrings)", broad_short="English prose (docstrings)",
               narrow=f"the held-out package {held_out.NARROW_PACKAGE} (python_stdlib_blocks)",
               narrow_short=f"{held_out.NARROW_PACKAGE}'s training split")
LM_DATA = {"data.include": NARROW["data.include"]}  # the lm task (configs/finetune.py: `email`) on NARROW's data

PRESETS = {
    "small": dict(
        # name -> model shape; context and batch are shared by every size. Non-embedding parameters: 1,760, 6,592,
        # 14,496 and 56,640 (32x). Estimated time: 228 cells run (104 skipped by the learning-rate choice), about
        # 11,900 cell-seconds at the previous study's per-size speeds on an idle 2-core Xeon (which ran 13,650 in 85
        # minutes, three at a time): about 75 minutes. Short runs on a busy 2-core EPYC (load 10-15) trained at 91K,
        # 86K, 30K and 15K tokens/s, and 2x8's slowest scratch cell (fraction 1) stopped early at step 1,500.
        sizes={"2x8": dict(n_layer=2, n_head=2, n_embd=8), "2x16": dict(n_layer=2, n_head=2, n_embd=16),
               "2x24": dict(n_layer=2, n_head=2, n_embd=24), "2x48": dict(n_layer=2, n_head=2, n_embd=48)},
        task_size="2x48",  # the pretrained models fine-tuned on every task with every strategy
        last_k=1,  # strategy last_k trains the last block of the task size's two (plus ln_f and the head)
        cpu_devices=1,  # one XLA device per cell: cells run side by side, one per core
        # Context 128: the sft prompts (a signature and a docstring line, median 92 bytes) must fit in 3/4 of
        # it (gptlab/data/supervised.py); at 64 only 33 training examples did. Batch 16: 2,048 tokens a step.
        block_size=128, batch_size=16,
        pretrain_steps=3000, pretrain_learning_rate=3e-3, pretrain_min_learning_rate=3e-4,  # 3000 x 16 x 128 = 6.1M tokens
        fractions=[4.0 ** -k for k in range(3, -1, -1)],  # 1/64, 1/16, 1/4, 1: log-spaced by factors of 4
        finetune_steps=1000,  # fine-tuning's step budget (6 epochs at fraction 1); early stopping ends cells sooner
        # scratch's: 4,000 steps, 25 epochs of its data at fraction 1 (it starts from nothing), so that early
        # stopping, not the cap, ends it
        scratch_steps=4000, scratch_eval_every=50,
        eval_every=25, eval_batches=8, test_batches=16,  # 16 x 2,048 tokens: more than `email`'s test split (25K)
        breadth_batches=32),  # breadth: 32 x 2,048 tokens of the pretraining corpus's validation split
    "gpu": dict(
        # Non-embedding parameters: 10.6M, 25.2M, 84.9M and 127.4M.
        sizes={"6x384": dict(n_layer=6, n_head=6, n_embd=384), "8x512": dict(n_layer=8, n_head=8, n_embd=512),
               "12x768": dict(n_layer=12, n_head=12, n_embd=768), "18x768": dict(n_layer=18, n_head=12, n_embd=768)},
        task_size="8x512",
        last_k=2, cpu_devices=None,
        block_size=256, batch_size=64, seeds=[0, 1, 2],
        pretrain_steps=10000, pretrain_learning_rate=6e-4, pretrain_min_learning_rate=6e-5,
        finetune_steps=3000, scratch_steps=12000, scratch_eval_every=200,
        eval_every=100, eval_batches=20, test_batches=64, breadth_batches=64),
    # Test-sized (tests/test_study.py runs it end to end): 1-layer models, two learning rates (the dynamic stage
    # still chooses), 49 cells run and 13 skipped: 11-17 minutes on 2 cores shared with other work (load 13-17).
    "tiny": dict(
        sizes={"1x8": dict(n_layer=1, n_head=1, n_embd=8), "1x16": dict(n_layer=1, n_head=2, n_embd=16)},
        task_size="1x16", last_k=1, cpu_devices=1, block_size=32, batch_size=8,
        pretrain_steps=30, pretrain_learning_rate=3e-3, pretrain_min_learning_rate=3e-4, finetune_steps=10,
        scratch_steps=20, scratch_eval_every=5, eval_every=5, eval_batches=2, test_batches=2, breadth_batches=2,
        fractions=[0.5, 1.0], seeds=[0, 1], lr_factors=(1.0, 3.0), strategies=("full", "head"), lora_ranks=(4,),
        tasks=("lm", "classify"), pretrain_overrides={"optimizer.warmup_steps": 5},
        cell_overrides={"optimizer.warmup_steps": 2}),
}


def get_config(preset: str = "small") -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)} (small: a CPU, gpu: a GPU)")
    p = PRESETS[preset]
    # What a preset may narrow (the tiny one does): the grid of the study.
    fractions, seeds, lr_factors = p.get("fractions", FRACTIONS), p.get("seeds", SEEDS), p.get("lr_factors", LR_FACTORS)
    scratch_factors = p.get("lr_factors", SCRATCH_LR_FACTORS)
    if len(seeds) < 2 and preset != "tiny":
        raise ValueError(f"preset {preset!r} needs at least 2 seeds (pretraining seeds per size)")
    strategies, lora_ranks, tasks = p.get("strategies", STRATEGIES), p.get("lora_ranks", LORA_RANKS), p.get("tasks", TASKS)
    steps = p["finetune_steps"]
    devices = {"parallel.cpu_devices": p["cpu_devices"]} if p["cpu_devices"] else {}
    shared = {"model.block_size": p["block_size"], "data.batch_size": p["batch_size"], "model.dropout": 0.0, **devices}

    def shape(size):  # a size's model fields, for pretraining and scratch (fine-tuning takes them from init_from)
        return {f"model.{k}": v for k, v in p["sizes"][size].items()}

    # What every scratch and fine-tuning cell shares: batch, warmup, evaluation, early stopping.
    budget = {**devices, "data.batch_size": p["batch_size"], "train.num_steps": steps, "optimizer.decay_steps": steps,
              "optimizer.warmup_steps": 20, "train.log_every": p["eval_every"], "train.eval_every": p["eval_every"],
              "train.checkpoint_every": 10 * p["eval_every"], "train.eval_batches": p["eval_batches"],
              "train.test_batches": p["test_batches"], "train.early_stopping_patience": PATIENCE,
              "train.early_stopping_min_delta": MIN_DELTA, **p.get("cell_overrides", {})}
    # What every fine-tuning cell adds: breadth, the pretraining corpus's validation split before and after.
    breadth = {"finetune.breadth": True, "finetune.breadth_batches": p["breadth_batches"]}
    # Scratch gets a larger budget (it starts from nothing), evaluated less often, with the same patience.
    scratch_steps = p["scratch_steps"]
    scratch_budget = {**budget, "train.num_steps": scratch_steps, "optimizer.decay_steps": scratch_steps,
                      "train.log_every": p["scratch_eval_every"], "train.eval_every": p["scratch_eval_every"],
                      "train.checkpoint_every": 10 * p["scratch_eval_every"]}
    rates = finetune_config.LEARNING_RATES

    def lr_grid(base, factors=lr_factors):  # rounded: the values name the cells
        return [float(f"{base * f:.6g}") for f in factors]

    def choose(metric="eval_loss"):  # the dynamic stage: seed 0 over the grid, the other seeds at its choice
        return {"key": "optimizer.learning_rate", "on_seed": seeds[0], "metric": metric}

    stages, roles = [], {"sizes": {}, "tasks": {}}
    for size in p["sizes"]:
        pretrain, scratch, full, zero = f"pretrain_{size}", f"scratch_{size}", f"full_{size}", f"zero_{size}_lm"
        stages += [
            dict(name=pretrain, experiment="pretrain", config="configs/pretrain.py:small", label=f"pretrain {size}",
                 overrides={**shared, **shape(size), **BROAD, "train.num_steps": p["pretrain_steps"],
                            "optimizer.learning_rate": p["pretrain_learning_rate"],
                            "optimizer.min_learning_rate": p["pretrain_min_learning_rate"],
                            "train.eval_every": p["pretrain_steps"] // 4,
                            "train.checkpoint_every": p["pretrain_steps"] // 4, "train.log_every": 50,
                            **p.get("pretrain_overrides", {})},
                 seeds=seeds),  # fine-tuning seed s starts from pretraining seed s (the sweep pairs them by seed)
            dict(name=scratch, experiment="pretrain", config="configs/pretrain.py:small", label=f"scratch {size}",
                 overrides={**shared, **shape(size), **NARROW, **scratch_budget},
                 grid={"data.train_fraction": fractions, "optimizer.learning_rate": lr_grid(SCRATCH_LEARNING_RATE, scratch_factors)},
                 seeds=seeds, choose=choose()),
            dict(name=full, experiment="finetune", config="configs/finetune.py:full,lm", init_from=pretrain,
                 label=f"fine-tuned {size}", overrides={**budget, **breadth, **LM_DATA},
                 grid={"data.train_fraction": fractions, "optimizer.learning_rate": lr_grid(rates["full"])},
                 seeds=seeds, choose=choose()),
            dict(name=zero, experiment="finetune", config="configs/finetune.py:full,lm", init_from=pretrain,
                 label=f"pretrained {size}, no fine-tuning", seeds=seeds,
                 overrides={**budget, **breadth, **LM_DATA, "train.num_steps": 0, "train.early_stopping_patience": 0}),
        ]
        roles["sizes"][size] = dict(pretrain=pretrain, scratch=scratch, finetuned=full, zero_shot=zero)

    arms = [dict(label=s, strategy=s, overrides={"finetune.last_k": p["last_k"]} if s == "last_k" else {})
            for s in strategies]
    arms += [dict(label=f"lora r{r}", strategy="lora", overrides={"finetune.lora_rank": r}) for r in lora_ranks]
    task_pretrain = roles["sizes"][p["task_size"]]["pretrain"]
    for task in tasks:
        metric = finetune_config.SELECTION_METRICS[task]
        # sft and classify score every example of their test split (the previous study's classify scored 256 of 1,583);
        # lm's test_batches already cover more tokens than its test split holds
        whole = {} if task == "lm" else {"train.test_batches": experiment_lib.WHOLE_SPLIT}
        zero = roles["sizes"][p["task_size"]]["zero_shot"] if task == "lm" else f"zero_{p['task_size']}_{task}"
        if task != "lm":
            stages.append(dict(name=zero, experiment="finetune", config=f"configs/finetune.py:full,{task}",
                               init_from=task_pretrain, label=f"pretrained, no fine-tuning ({task})", seeds=seeds,
                               overrides={**budget, **breadth, **whole, "train.num_steps": 0,
                                          "train.early_stopping_patience": 0, "train.selection_metric": metric}))
        arm_stages = {}
        for arm in arms:
            if task == "lm" and arm["label"] == "full":  # the data-efficiency cells at fraction 1
                arm_stages[arm["label"]] = roles["sizes"][p["task_size"]]["finetuned"]
                continue
            name = f"{arm['label'].replace(' ', '_')}_{task}"
            stages.append(dict(name=name, experiment="finetune", config=f"configs/finetune.py:{arm['strategy']},{task}",
                               init_from=task_pretrain, label=f"{arm['label']} ({task})",
                               overrides={**budget, **breadth, **(LM_DATA if task == "lm" else {}), **whole,
                                          **arm["overrides"], "train.selection_metric": metric},
                               grid={"optimizer.learning_rate": lr_grid(rates[arm["strategy"]])}, seeds=seeds,
                               choose=choose(metric)))
            arm_stages[arm["label"]] = name
        roles["tasks"][task] = dict(zero_shot=zero, arms=arm_stages, selection_metric=metric)

    return dict(
        name=f"pretrain_vs_finetune_{preset}",
        description=(
            f"{len(p['sizes'])} model sizes pretrained on English prose (the docstrings of the Python standard library "
            f"without the held-out packages); on the code of the held-out package {held_out.NARROW_PACKAGE} at "
            f"{len(fractions)} log-spaced fractions of its training split, training from "
            "scratch against full fine-tuning (data efficiency, effective data transferred); then one pretrained model "
            f"fine-tuned on {len(tasks)} held-out tasks ({', '.join(tasks)}) with {', '.join(strategies)} and LoRA "
            f"(rank {' and '.join(map(str, lora_ranks))}). Early stopping on validation within a step budget, the "
            f"learning rate chosen on validation on seed {seeds[0]} and the other seeds run at it, {len(seeds)} "
            "pretraining and fine-tuning seeds (fine-tuning seed s from pretraining seed s); every number is a best "
            "checkpoint's test-split score; every fine-tuning cell also scores the pretraining corpus (breadth)."),
        metric="test_loss",
        stages=stages,
        report=dict(rows="label", columns="data.train_fraction", select=["optimizer.learning_rate"],
                    selection_metric="eval_loss"),
        study=dict(report="projects.pretrain_vs_finetune.report",  # the module whose write_study(DIR) writes it
                   preset=preset, fractions=fractions, seeds=seeds, select="optimizer.learning_rate",
                   # fine-tuning and zero-shot cells of seed s start from pretrain_SIZE's cell of seed s; the learning
                   # rate is chosen on seed choose_on_seed (DIR/choices.json) and the other seeds run only at it
                   pretrain_seeds=seeds, seed_pairing="same", choose_on_seed=seeds[0], min_delta=MIN_DELTA,
                   breadth=dict(dataset=BROAD["data.dataset"], split="validation", batches=p["breadth_batches"]),
                   budgets=dict(finetune=steps, scratch=scratch_steps, eval_every=p["eval_every"],
                                scratch_eval_every=p["scratch_eval_every"]),
                   task_size=p["task_size"], corpora=CORPORA, **roles),
    )
