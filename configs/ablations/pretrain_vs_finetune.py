"""Pretraining vs fine-tuning: does a model pretrained on broad code help on a narrow corpus it never saw?

    python -m experiments.sweep --config=configs/ablations/pretrain_vs_finetune.py:small \\
        --workdir=/tmp/gptlab/pretrain_vs_finetune --parallel=2
    python -m experiments.report --workdir=/tmp/gptlab/pretrain_vs_finetune

Protocol (gptlab/selection.py, gptlab/report.py): pretraining never reads the held-out
packages (gptlab/data/held_out.py); the narrow corpus is `email`'s top-level blocks, split
80/10/10. Every scratch and fine-tuning cell trains until early stopping on validation
eval_loss ends it (patience PATIENCE evaluations) or its step budget is reached (scratch
gets the fine-tuning budget or more); the learning rate is gridded per strategy and the
report chooses it per strategy and data fraction on validation; the main table reports
`test_loss` of each cell's best checkpoint, with the chosen learning rate, the steps to
the best checkpoint and "(cap)" where a cell hit its budget while still improving.

Stages (each cell a separate run in WORKDIR/runs/CELL/):
  pretrain   once, on the broad corpus: the standard library minus `test/` and the
             held-out packages.
  scratch    a fresh model of the same shape trained on the narrow corpus only:
             what pretraining is measured against.
  zero_shot  the pretrained model evaluated on the narrow corpus without any
             fine-tuning (train.num_steps=0): what fine-tuning is measured against.
             Nothing it computes depends on the seed or the data fraction.
  finetune   the pretrained model fine-tuned on the narrow corpus with each strategy of
             configs/finetune.py: full, last_k (last 2 of 4 blocks + ln_f + head), head,
             bitfit, layernorm, and LoRA at ranks 4 and 16.
Scratch and fine-tuning cells run at 1%, 10% and 100% of the narrow corpus's training
split, 3 seeds each, at the same batch size. Choices read `email`'s validation blocks;
the table reads its test blocks (nats per byte-level token).

Presets:
  small  a 2-core CPU: the `small` model (4 layers, 128 wide, context 128, 0.83M
         parameters), pretrained 600 steps, then 40 steps per cell at batch 16:
         76 cells, about 25 minutes with --parallel=2 (docs/results/pretrain_vs_finetune/).
  full   a GPU: a 6-layer, 384-wide model with context 256 (10.7M parameters),
         pretrained 5000 steps at batch 64, then 500 steps per cell.
"""

from configs import finetune as finetune_config
from gptlab.data import held_out

STRATEGIES = ("full", "last_k", "head", "bitfit", "layernorm")
LORA_RANKS = (4, 16)
FRACTIONS = [0.01, 0.1, 1.0]
SEEDS = [0, 1, 2]
LR_FACTORS = (0.5, 1.0, 2.0)  # the learning-rate grid: each strategy's configs/finetune.py rate times these
PATIENCE = 3  # evaluations without a better validation eval_loss before a cell stops
# The lm task's data (configs/finetune.py TASK_DATA): held-out `email`, by top-level block.
NARROW = {"data.dataset": "python_stdlib_blocks", "data.include": held_out.globs((held_out.NARROW_PACKAGE,)),
          "data.exclude": held_out.STDLIB_TESTS}


def get_config(preset: str = "small") -> dict:
    if preset == "small":
        model = {}  # the `small` preset's model
        pretrain = {"train.num_steps": 600}
        steps, batch = 400, 16  # a budget cap: early stopping ends most cells sooner
        cell = {"train.log_every": 10, "train.eval_every": 20, "train.checkpoint_every": 100}
    elif preset == "full":
        model = {"model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.block_size": 256}
        pretrain = {"train.num_steps": 5000, "data.batch_size": 64, "optimizer.learning_rate": 1e-3,
                    "optimizer.min_learning_rate": 1e-4, "optimizer.warmup_steps": 200,
                    "train.eval_every": 500, "train.checkpoint_every": 1000}
        steps, batch = 3000, 64
        cell = {"train.log_every": 10, "train.eval_every": 100, "train.checkpoint_every": 250}
    else:
        raise ValueError(f"unknown preset {preset!r}: choose small (a CPU) or full (a GPU)")
    # What every scratch and fine-tuning cell shares: equal steps, batch, warmup and evaluation.
    budget = {"train.num_steps": steps, "data.batch_size": batch, "optimizer.warmup_steps": 20,
              "optimizer.decay_steps": steps, "train.eval_batches": 10, "train.early_stopping_patience": PATIENCE,
              "train.selection_metric": "eval_loss", **cell}
    # Scratch gets at least the fine-tuning budget: twice the steps, the same patience.
    scratch_budget = {**budget, "train.num_steps": 2 * steps, "optimizer.decay_steps": 2 * steps}
    rates = finetune_config.LEARNING_RATES

    def lr_grid(strategy):  # per strategy: the report picks one of these per data fraction, on validation
        return [rates[strategy] * f for f in LR_FACTORS]

    variants = [dict(label=s, config=f"configs/finetune.py:{s}") for s in STRATEGIES]
    variants += [dict(label=f"lora r{r}", config="configs/finetune.py:lora", **{"finetune.lora_rank": r})
                 for r in LORA_RANKS]
    finetune_stages = [
        dict(name=f"finetune_{v['label'].replace(' ', '_')}", experiment="finetune", config=v["config"],
             init_from="pretrain", label=v["label"],
             overrides={**budget, **{k: x for k, x in v.items() if k not in ("label", "config")}},
             grid={"data.train_fraction": FRACTIONS,
                   "optimizer.learning_rate": lr_grid(v["config"].rsplit(":", 1)[1])}, seeds=SEEDS)
        for v in variants]
    return dict(
        name=f"pretrain_vs_finetune_{preset}",
        description=(
            "Pretrain once on the Python standard library without the `email` package; then, on `email` "
            "alone at 1%, 10% and 100% of its training split, compare training from scratch, the "
            "pretrained model without fine-tuning, and fine-tuning with full, last_k, head, bitfit, "
            "layernorm and LoRA (ranks 4 and 16): early stopping on validation within a step budget, the "
            "learning rate chosen per strategy and fraction on validation, 3 seeds each; the table reports the "
            "best checkpoints' loss on `email`'s test blocks."),
        metric="test_loss",
        stages=[
            dict(name="pretrain", experiment="pretrain", config="configs/pretrain.py:small",
                 overrides={**model, **pretrain}),
            dict(name="scratch", experiment="pretrain", config="configs/pretrain.py:small", label="scratch",
                 overrides={**model, **NARROW, **scratch_budget},
                 grid={"data.train_fraction": FRACTIONS, "optimizer.learning_rate": [1e-3, 2e-3, 4e-3]},
                 seeds=SEEDS),
            dict(name="zero_shot", experiment="finetune", config="configs/finetune.py:full", init_from="pretrain",
                 label="pretrained, no fine-tuning",
                 overrides={**budget, "train.num_steps": 0, "train.early_stopping_patience": 0}, seeds=SEEDS),
            *finetune_stages,
        ],
        report=dict(rows="label", columns="data.train_fraction", select=["optimizer.learning_rate"],
                    selection_metric="eval_loss"),
    )
