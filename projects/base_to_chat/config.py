"""From base model to assistant: base pretraining -> chat SFT -> DPO, measured stage by stage.

    python -m experiments.study --config=projects/base_to_chat/config.py:cpu --workdir=DIR

runs the three stages as a sweep (rerunning resumes: a finished stage is never redone), measures each
stage's checkpoint (card.py: cached per run, so a rerun measures only what is new) and writes DIR/study/:
report.md, report.tex, table_*.csv, card.json and results.jsonl (report.py beside this file).

Stages (each a cell of the sweep, in DIR/runs/CELL/):
  base   a model pretrained on the standard library minus test/ and the held-out packages (configs/pretrain.py's
         corpus), one seed: the base every other stage starts from.
  sft    chat SFT (configs/finetune.py:full,chat) from base on the embedded conversations about the held-out
         packages (gptlab/chat/corpus.py), loss on assistant turns only; one run per seed.
  dpo    DPO (configs/finetune.py:full,dpo) from the SFT run of the same seed (its last checkpoint) on the
         embedded preference pairs, the SFT model as the frozen reference; one run per seed and learning rate of
         the preset's grid: the report keeps the learning rate whose runs have the best mean preference accuracy
         on the VALIDATION pairs (never test), and reports the test split for it alone.
Every stage trains for a fixed number of steps (no early stopping), so the model each stage hands on is its last.

Presets:
  cpu   a 2-core CPU, meant for about 20 minutes on idle cores (not yet measured idle: the committed card took
        45 min under a load of 13-18): 4 layers, 128 wide, byte-level, context 256 (long enough that the
        first assistant turn of about 60% of the conversations fits whole; the data code cuts longer prompts from
        the left, so every assistant turn keeps its answer), 3 seeds of SFT and DPO. DPO's learning rate is chosen
        on the validation pairs from `dpo_learning_rates` (one value in this preset so far: its beta, rate and
        steps are not yet tuned).
  gpu   one GPU in a few minutes: a ~100M-parameter model (12 layers, 768 wide, context 512, bf16),
        the same pipeline (dev/gpu_checks.sh runs it).
  tiny  test-sized (1 layer, a handful of steps): it checks that everything runs; its numbers mean nothing.
"""

SEEDS = [0, 1, 2]

PRESETS = {
    "cpu": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
        batch_size=16, cpu_devices=1,
        base_steps=600, base_learning_rate=2e-3, base_warmup=50,  # 600 x 16 x 256 = 2.5M tokens
        sft_steps=150, sft_learning_rate=5e-4,  # 2,400 of the 3,435 training conversations
        # DPO on the first 20% of the training pairs (687; 40 x 16 = 640 seen): the reference's
        # log-probabilities are computed for every pair before the first step, so unused pairs cost time.
        # The learning rate is chosen on the validation pairs from dpo_learning_rates (report.py); one here:
        # on the loaded 2-core machine the report card was made on there was no time for a second.
        dpo_steps=40, dpo_learning_rates=[2e-4], dpo_beta=0.1, dpo_train_fraction=0.2,
        eval_every=100, eval_batches=4,
        # the card (card.py): conversations and pairs of the test split measured, the reply cap in tokens,
        # windows of the pretraining corpus's validation split for bits per byte
        card=dict(conversations=150, pairs=200, cap=48, breadth_batches=12),
        seeds=SEEDS),
    "gpu": dict(
        model=dict(n_layer=12, n_head=12, n_embd=768, block_size=512, dtype="bfloat16"),
        batch_size=32, cpu_devices=None,
        base_steps=2000, base_learning_rate=6e-4, base_warmup=100,
        sft_steps=300, sft_learning_rate=1e-4,
        dpo_steps=150, dpo_learning_rates=[2e-5], dpo_beta=0.1, dpo_train_fraction=1.0,
        eval_every=100, eval_batches=8,
        card=dict(conversations=546, pairs=546, cap=128, breadth_batches=64),
        seeds=SEEDS),
    "tiny": dict(
        model=dict(n_layer=1, n_head=2, n_embd=16, block_size=64),
        batch_size=4, cpu_devices=1,
        base_steps=6, base_learning_rate=3e-3, base_warmup=2,
        sft_steps=4, sft_learning_rate=1e-3,
        dpo_steps=3, dpo_learning_rates=[1e-4, 4e-4], dpo_beta=0.1, dpo_train_fraction=0.5,
        eval_every=2, eval_batches=1,
        card=dict(conversations=6, pairs=6, cap=8, breadth_batches=2),
        seeds=[0, 1]),
}

STAGES = ("base", "sft", "dpo")


def get_config(preset: str = "cpu") -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)} (cpu: a 2-core CPU, "
                         "gpu: one GPU, tiny: tests)")
    p = PRESETS[preset]
    devices = {"parallel.cpu_devices": p["cpu_devices"]} if p["cpu_devices"] else {}
    model = {f"model.{k}": v for k, v in p["model"].items()}

    def schedule(steps, learning_rate, warmup):
        every = min(p["eval_every"], steps)
        return {"train.num_steps": steps, "optimizer.decay_steps": steps, "optimizer.learning_rate": learning_rate,
                "optimizer.min_learning_rate": learning_rate / 10, "optimizer.warmup_steps": warmup,
                "train.log_every": max(1, every // 4), "train.eval_every": every, "train.checkpoint_every": steps,
                "train.eval_batches": p["eval_batches"], "train.test_batches": p["eval_batches"],
                # the card measures each stage itself (card.py): the runs' own test score is a small one
                "train.early_stopping_patience": 0}

    finetune = {**devices, "data.batch_size": p["batch_size"], "model.dropout": 0.0}
    warmup = max(1, min(20, p["sft_steps"] // 10))
    stages = [
        dict(name="base", experiment="pretrain", config="configs/pretrain.py:small", label="base",
             overrides={**devices, **model, "model.dropout": 0.0, "data.batch_size": p["batch_size"],
                        **schedule(p["base_steps"], p["base_learning_rate"], p["base_warmup"])}),
        dict(name="sft", experiment="finetune", config="configs/finetune.py:full,chat", init_from="base",
             label="chat SFT", seeds=p["seeds"],
             overrides={**finetune, **schedule(p["sft_steps"], p["sft_learning_rate"], warmup)}),
        dict(name="dpo", experiment="finetune", config="configs/finetune.py:full,dpo", init_from="sft",
             label="DPO", seeds=p["seeds"],
             overrides={**finetune, **schedule(p["dpo_steps"], min(p["dpo_learning_rates"]), warmup),
                        "finetune.dpo_beta": p["dpo_beta"], "data.train_fraction": p["dpo_train_fraction"]},
             grid={"optimizer.learning_rate": p["dpo_learning_rates"]}),
    ]
    return dict(
        name=f"base_to_chat_{preset}",
        description=(f"A {p['model']['n_layer']}-layer, {p['model']['n_embd']}-wide byte-level GPT (context "
                     f"{p['model']['block_size']}) pretrained on the Python standard library without test/ and the "
                     f"held-out packages ({p['base_steps']} steps), fine-tuned for chat on conversations about the "
                     f"held-out packages ({p['sft_steps']} steps, full SFT, loss on assistant turns only), then "
                     f"preference-tuned with DPO ({p['dpo_steps']} steps, beta {p['dpo_beta']}, the SFT model the "
                     + (f"reference, the learning rate chosen from {p['dpo_learning_rates']} on the validation pairs); "
                        if len(p["dpo_learning_rates"]) > 1 else f"reference, learning rate {p['dpo_learning_rates'][0]:g}); ")
                     + f"{len(p['seeds'])} seeds of SFT and DPO, one base."),
        metric="test_loss",
        stages=stages,
        study=dict(report="projects.base_to_chat.report", preset=preset, seeds=p["seeds"], card=p["card"],
                   stages=list(STAGES), budgets={s: p[f"{s}_steps"] for s in STAGES}),
    )
