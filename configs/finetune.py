"""Fine-tuning a pretrained GPT: a strategy (what trains) and a task (what it learns).

Run from the repository root, after pretraining (the README quick start):

    python -m experiments.finetune --config=configs/finetune.py:lora --workdir=/tmp/gptlab/ft_lora \\
        --config.finetune.init_from=/tmp/gptlab/pretrain

Presets: STRATEGY[,TASK][,tiny], e.g. `lora`, `head,classify`, `lora,sft`, `full,lm,tiny`, `full,chat`.
  STRATEGY  full, head, last_k, bitfit, layernorm, lora, or regex (give finetune.trainable)
  TASK      lm (default): language modelling on the held-out `email` package, one document
                per top-level block (python_stdlib_blocks); selection on eval_loss
            sft: supervised fine-tuning, prompt = a function's signature and docstring
                summary, response = its body (python_stdlib_functions, all held-out packages);
                loss on the response only; selection on eval_loss
            classify: which of the 8 held-out packages a code snippet comes from
                (python_stdlib_packages); selection on eval_accuracy
            chat: chat SFT on conversations (gptlab/chat/): the chat template's tokens are
                added (the embedding grows), loss on assistant turns and their end-of-turn
                token only; data.path=FILE.jsonl ({"messages": [...]} per line) or, unset,
                the embedded conversations about the held-out packages; eval_loss is the
                assistant-token loss
            dpo: preference tuning (DPO, finetune.dpo_beta; IPO with finetune.dpo_loss=ipo)
                from the starting checkpoint as the frozen reference; data.path=FILE.jsonl in
                TRL's {"prompt", "chosen", "rejected"} format or the embedded pairs; selection
                on eval_loss, eval_accuracy is the preference accuracy. Usually init_from a chat run.
              With data.path, validation and test are the file's lines a stable hash puts there
              (10% each) unless data.eval_path / data.test_path name their own files.
            Every task draws only from the packages that pretraining leaves out
            (gptlab/data/held_out.py), split 80/10/10 by top-level block.
  tiny      test-sized (20 steps, no early stopping), for checkpoints of the `tiny` pretraining preset

The model architecture and tokenizer come from the init_from run: every `model.*` field
here is None ("as pretrained") unless a preset or an override sets it. An override that
changes a pretrained parameter's shape is an error.

Tied embeddings: GPT-2 ties its output head to the token embedding `wte`, so "train only
the head" would also move the input embedding. The `head` and `last_k` presets set
model.tie_embeddings=False, which unties a tied checkpoint: `lm_head` becomes a parameter
of its own, initialised as wte^T (the model starts exactly equal), and trains alone.
"""
from ml_collections import config_dict

from configs import pretrain
from gptlab.data import held_out

STRATEGIES = ("full", "head", "last_k", "bitfit", "layernorm", "lora", "regex")
TASKS = ("lm", "sft", "classify", "chat", "dpo")
# Peak learning rates: the fewer (and the more newly initialised) the trainable
# parameters, the larger the step they take; full fine-tuning stays below pretraining's.
LEARNING_RATES = {"full": 5e-4, "head": 3e-3, "last_k": 1e-3, "bitfit": 3e-3, "layernorm": 3e-3,
                  "lora": 2e-3, "regex": 1e-3}
# DPO moves a model that already answers: a tenth of the SFT rate (TRL's default is 1e-6 at 7B scale).
DPO_LR_FACTOR = 0.1
# Every task's data, from the held-out packages only (the one definition: gptlab/data/held_out.py).
TASK_DATA = {
    "lm": dict(dataset="python_stdlib_blocks", include=held_out.globs((held_out.NARROW_PACKAGE,))),
    "sft": dict(dataset="python_stdlib_functions", include=held_out.globs()),
    "classify": dict(dataset="python_stdlib_packages", include=held_out.globs()),
    # Built in memory by gptlab/chat/corpus.py (no TFDS) from the files these globs select.
    "chat": dict(dataset="python_stdlib_chat", include=held_out.globs()),
    "dpo": dict(dataset="python_stdlib_chat", include=held_out.globs()),
}
SELECTION_METRICS = {"lm": "eval_loss", "sft": "eval_loss", "classify": "eval_accuracy", "chat": "eval_loss",
                     "dpo": "eval_loss"}
PACKAGES = held_out.PACKAGES


def get_config(arg: str = "lora") -> config_dict.ConfigDict:
    parts = [p.strip() for p in arg.split(",") if p.strip()]
    strategy = parts[0] if parts else "lora"
    tasks = [p for p in parts[1:] if p in TASKS]
    tiny = "tiny" in parts[1:]
    unknown = [p for p in parts[1:] if p not in TASKS and p != "tiny"]
    if strategy not in STRATEGIES or unknown or len(tasks) > 1:
        raise ValueError(f"unknown preset {arg!r}: use STRATEGY[,TASK][,tiny] with STRATEGY one of {STRATEGIES} "
                         f"and TASK one of {TASKS}")
    task = tasks[0] if tasks else "lm"

    config = pretrain.get_config("tiny" if tiny else "small")
    with config.unlocked():
        config.preset = arg  # which preset of this file the config started from

        model = config.model
        for name, value in list(model.items()):  # None: the value stored by the init_from run
            if value is not None:
                model[name] = config_dict.placeholder(type(value))
        if strategy in ("head", "last_k"):
            model.tie_embeddings = False  # untie a tied checkpoint: lm_head starts as wte^T, trains alone

        config.finetune = ft = config_dict.ConfigDict()
        ft.init_from = config_dict.placeholder(str)  # pretraining workdir (latest checkpoint) or its checkpoints/STEP
        ft.strategy = strategy  # what trains: full, head, last_k, bitfit, layernorm, lora or regex
        ft.task = task  # what it learns: lm (next token), sft (response tokens only) or classify
        ft.last_k = 2  # strategy=last_k: how many of the last blocks train (plus ln_f and the head)
        ft.lora_rank = 8  # strategy=lora: rank of the adapters
        ft.lora_alpha = 16.0  # strategy=lora: the adapters' output is scaled by lora_alpha / lora_rank
        ft.lora_targets = (r"blocks_\d+/attn/(qkv|proj)/kernel",)  # strategy=lora: kernels to adapt (regexes)
        ft.trainable = ()  # regexes of parameters that train too (strategy=regex: the only ones)
        ft.export_merged = True  # strategy=lora: write WORKDIR/merged, adapters folded into plain kernels
        # Breadth: also score the pretraining corpus's validation split (init_from's own data config) with the
        # pretrained parameters and with the best checkpoint; result.json's `breadth` holds both (loss, bits per
        # byte). Off for plain fine-tuning (it costs two evaluations); the pretrain_vs_finetune study turns it on.
        ft.breadth = False
        ft.breadth_batches = config_dict.placeholder(int)  # breadth: batches of that split scored; None: all of it
        ft.dpo_beta = 0.1  # task dpo: strength of the pull towards the reference (larger: stay closer)
        ft.dpo_loss = "sigmoid"  # task dpo: sigmoid (DPO) or ipo (IPO, on per-token mean log-probabilities)

        data = config.data
        data.tokenizer = config_dict.placeholder(str)  # None: the init_from run's tokenizer (the only valid one)
        data.prompt_key = "prompt"  # task sft: the feature holding the prompt
        data.response_key = "response"  # task sft: the feature holding the response
        data.label_key = "label"  # task classify: the ClassLabel feature
        data.packages = PACKAGES  # dataset python_stdlib_packages: the classes (top-level packages)
        data.path = config_dict.placeholder(str)  # tasks chat/dpo: a JSONL file; None: the embedded chat data
        data.eval_path = config_dict.placeholder(str)  # tasks chat/dpo: validation file; None: data.path's hash
        data.test_path = config_dict.placeholder(str)  # tasks chat/dpo: test file; None: data.path's hash
        data.dataset = TASK_DATA[task]["dataset"]
        data.include, data.exclude = TASK_DATA[task]["include"], held_out.STDLIB_TESTS

        opt = config.optimizer
        opt.learning_rate = LEARNING_RATES[strategy] * (DPO_LR_FACTOR if task == "dpo" else 1.0)
        opt.min_learning_rate = opt.learning_rate / 10
        opt.warmup_steps = 5 if tiny else 20
        # weight_decay (0.1) and weight_decay_on (kernels) as in pretraining; only trainable parameters decay.

        train = config.train
        train.selection_metric = SELECTION_METRICS[task]
        train.eval_at_start = True  # the untouched pretrained model competes for best checkpoint: never worse than it
        if tiny:
            train.num_steps, train.log_every, train.eval_every, train.eval_batches = 20, 5, 10, 2
            train.checkpoint_every = 10
        else:
            # A budget cap: early stopping (3 evaluations without improvement) usually ends the run before it.
            train.num_steps, train.log_every, train.eval_every, train.eval_batches = 1000, 25, 50, 10
            train.early_stopping_patience = 3
            train.checkpoint_every = 100
            if task == "classify":  # 640 validation snippets: accuracy's standard error about 2 points
                train.eval_batches = 40
    config.lock()
    return config
