"""A tiny sweep for tests and for trying the sweep machinery: seconds per cell on a CPU.

    python -m experiments.sweep --config=configs/ablations/smoke.py --workdir=/tmp/gptlab/smoke
    python -m experiments.report --workdir=/tmp/gptlab/smoke

Pretrains the `tiny` preset once, then fine-tunes it (full and BitFit) on the
held-out narrow corpus at two data fractions with two seeds: 9 cells.
"""


def get_config(arg: str = "") -> dict:
    del arg  # one preset
    steps = {"train.log_every": 2, "train.eval_every": 2, "train.checkpoint_every": 2, "train.eval_batches": 1}
    return dict(
        name="smoke",
        description="Tiny end-to-end check of sweeps: pretrain `tiny`, fine-tune two ways at two data fractions.",
        metric="eval_loss",
        stages=[
            dict(name="pretrain", experiment="pretrain", config="configs/pretrain.py:tiny",
                 overrides={**steps, "train.num_steps": 6}),
            dict(name="finetune", experiment="finetune", config="configs/finetune.py:full,tiny", init_from="pretrain",
                 overrides={**steps, "train.num_steps": 4},
                 variants=[dict(label="full"), dict(label="bitfit", config="configs/finetune.py:bitfit,tiny")],
                 grid={"data.train_fraction": [0.1, 1.0]}, seeds=[0, 1]),
        ],
        report=dict(rows="label", columns="data.train_fraction"),
    )
