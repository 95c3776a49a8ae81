"""Pretraining vs fine-tuning: does a model pretrained on broad code help on a narrow corpus it never saw?

    python -m experiments.sweep --config=configs/ablations/pretrain_vs_finetune.py:small \\
        --workdir=/tmp/gptlab/pretrain_vs_finetune --parallel=2
    python -m experiments.report --workdir=/tmp/gptlab/pretrain_vs_finetune

Stages (each cell a separate run in WORKDIR/runs/CELL/):
  pretrain   once, on the broad corpus: the standard library minus `test/` and the
             held-out `email` package (configs/pretrain.py HELD_OUT_PACKAGE).
  scratch    a fresh model of the same shape trained on the narrow corpus (`email/*`)
             only: what pretraining is measured against.
  zero_shot  the pretrained model evaluated on the narrow corpus without any
             fine-tuning (train.num_steps=0): what fine-tuning is measured against.
             Nothing it computes depends on the seed or the data fraction.
  finetune   the pretrained model fine-tuned on the narrow corpus with each strategy of
             configs/finetune.py: full, last_k (last 2 of 4 blocks + ln_f + head), head,
             bitfit, layernorm, and LoRA at ranks 4 and 16.
Scratch and fine-tuning cells run at 1%, 10% and 100% of the narrow corpus's training
split, 3 seeds each, for the same number of steps and batch size (equal compute budget
in tokens; the strategies' learning rates are configs/finetune.py's). Everything is
evaluated on the same split: the `email` package's validation files (eval_loss,
nats per byte-level token), all of its 10 batches.

Presets:
  small  a 2-core CPU: the `small` model (4 layers, 128 wide, context 128, 0.83M
         parameters), pretrained 600 steps, then 40 steps per cell at batch 16:
         76 cells, about 25 minutes with --parallel=2 (docs/results/pretrain_vs_finetune/).
  full   a GPU: a 6-layer, 384-wide model with context 256 (10.7M parameters),
         pretrained 5000 steps at batch 64, then 500 steps per cell.
"""

STRATEGIES = ("full", "last_k", "head", "bitfit", "layernorm")
LORA_RANKS = (4, 16)
FRACTIONS = [0.01, 0.1, 1.0]
SEEDS = [0, 1, 2]
NARROW = {"data.include": ("email/*",), "data.exclude": ()}  # configs/finetune.py's lm task; see HELD_OUT_PACKAGE


def get_config(preset: str = "small") -> dict:
    if preset == "small":
        model = {}  # the `small` preset's model
        pretrain = {"train.num_steps": 600}
        steps, batch = 40, 16
        cell = {"train.log_every": 5, "train.eval_every": 20, "train.checkpoint_every": 20}
    elif preset == "full":
        model = {"model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.block_size": 256}
        pretrain = {"train.num_steps": 5000, "data.batch_size": 64, "optimizer.learning_rate": 1e-3,
                    "optimizer.min_learning_rate": 1e-4, "optimizer.warmup_steps": 200,
                    "train.eval_every": 500, "train.checkpoint_every": 1000}
        steps, batch = 500, 64
        cell = {"train.log_every": 10, "train.eval_every": 100, "train.checkpoint_every": 250}
    else:
        raise ValueError(f"unknown preset {preset!r}: choose small (a CPU) or full (a GPU)")
    # What every scratch and fine-tuning cell shares: equal steps, batch, warmup and evaluation.
    budget = {"train.num_steps": steps, "data.batch_size": batch, "optimizer.warmup_steps": steps // 10,
              "train.eval_batches": 10, **cell}
    variants = [dict(label=s, config=f"configs/finetune.py:{s}") for s in STRATEGIES]
    variants += [dict(label=f"lora r{r}", config="configs/finetune.py:lora", **{"finetune.lora_rank": r})
                 for r in LORA_RANKS]
    return dict(
        name=f"pretrain_vs_finetune_{preset}",
        description=(
            "Pretrain once on the Python standard library without the `email` package; then, on `email` "
            "alone at 1%, 10% and 100% of its training split, compare training from scratch, the "
            "pretrained model without fine-tuning, and fine-tuning with full, last_k, head, bitfit, "
            "layernorm and LoRA (ranks 4 and 16): equal steps and batch, 3 seeds each, evaluated on "
            "`email`'s validation split."),
        metric="eval_loss",
        stages=[
            dict(name="pretrain", experiment="pretrain", config="configs/pretrain.py:small",
                 overrides={**model, **pretrain}),
            dict(name="scratch", experiment="pretrain", config="configs/pretrain.py:small", label="scratch",
                 overrides={**model, **NARROW, **budget}, grid={"data.train_fraction": FRACTIONS}, seeds=SEEDS),
            dict(name="zero_shot", experiment="finetune", config="configs/finetune.py:full", init_from="pretrain",
                 label="pretrained, no fine-tuning",
                 overrides={**budget, "train.num_steps": 0}, seeds=SEEDS),
            dict(name="finetune", experiment="finetune", config="configs/finetune.py:full", init_from="pretrain",
                 overrides=budget, variants=variants, grid={"data.train_fraction": FRACTIONS}, seeds=SEEDS),
        ],
        report=dict(rows="label", columns="data.train_fraction"),
    )
