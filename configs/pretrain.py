"""Pretraining a GPT language model from scratch.

Run from the repository root, choosing a preset after the colon:

    python -m experiments.pretrain --config=configs/pretrain.py:small --workdir=/tmp/run

Presets:
  tiny       2 layers, 64 wide; seconds on a CPU. For tests and smoke runs.
  small      4 layers, 128 wide, byte-level, on the standard library minus `test/`
             and the held-out packages (gptlab/data/held_out.py): the README quick start, about 2
             minutes on a 2-core CPU; train loss 4.42 at step 25 -> 1.92, eval 1.81.
  gpt2_124m  GPT-2 small (12 layers, 768 wide, context 1024, bf16): for GPUs.
  small_llama
             `small` as a Llama-style model: rotary positions, RMSNorm, SwiGLU, 4 heads
             sharing 2 key/value heads, no biases; a CPU preset beside `small`.
  smollm2_135m
             SmolLM2-135M's architecture and size (30 layers, 576 wide, 9 heads, 3 key/
             value heads, SwiGLU 1536, RoPE theta 100000, tied, context 2048, vocabulary
             49152: 134.5M parameters), byte tokens, bf16, scanned blocks: for GPUs.
  shakespeare_char
             nanoGPT's baby GPT on tiny_shakespeare, character level (6 layers, 6 heads,
             384 wide, context 256, batch 64, dropout 0.2, lr 1e-3 -> 1e-4 cosine over
             5000 steps, warmup 100, beta2 0.99, eval every 250 steps on 200 batches).
             nanoGPT reaches a best validation loss of 1.4697 in about 3 minutes on an A100.
  shakespeare_char_cpu
             nanoGPT README's CPU run of it: 4 layers, 4 heads, 128 wide, context 64,
             batch 12, 2000 steps, no dropout; validation loss about 1.88 (nanoGPT),
             1.86 in 6 minutes on a shared 2-core CPU (~5,000 tokens/s).

Offline, the Shakespeare presets need the corpus file the TFDS builder downloads
(input.txt) in a manual_dir:

    python -m experiments.pretrain --config=configs/pretrain.py:shakespeare_char_cpu \
        --workdir=/tmp/shakespeare --config.data.manual_dir=../shared/data/tinyshakespeare

Any field can be overridden: `--config.train.num_steps=50 --config.model.dropout=0.1`.
The config is locked, so a mistyped field name is an error.
"""
from ml_collections import config_dict

from gptlab.data import held_out

# Every stdlib preset leaves out `test/` and the held-out packages (gptlab/data/held_out.py), which
# the fine-tuning tasks draw from: pretraining never reads a file that any task trains or is scored on.
PRETRAIN_EXCLUDE = held_out.PRETRAIN_EXCLUDE


def get_config(preset: str = "small") -> config_dict.ConfigDict:
    config = config_dict.ConfigDict()
    config.preset = preset  # which preset of this file the config started from
    config.seed = 0  # seeds parameter init, data order and dropout

    config.model = model = config_dict.ConfigDict()
    model.n_layer = 4  # number of transformer blocks
    model.n_head = 4  # attention heads per block
    model.n_embd = 128  # width of the residual stream
    model.n_kv_head = 0  # key/value heads; 0: n_head (multi-head), fewer: grouped-query attention (Llama 2/3)
    model.block_size = 128  # the model's context: longest sequence in tokens
    model.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's; larger pads (e.g. 50304)
    model.dropout = 0.0  # dropout on embeddings, attention and residual branches
    model.bias = True  # biases in Linear and LayerNorm layers (GPT-2: True)
    model.qkv_bias = False  # biases on the query/key/value projection even when bias=False (Qwen2: True)
    model.tie_embeddings = True  # output head shares the token embedding matrix (GPT-2: True)
    model.position = "learned"  # position information: learned (GPT-2 absolute embeddings) or rope (Llama)
    model.rope_theta = 10000.0  # position=rope: base of the rotary frequencies
    model.norm = "layernorm"  # layernorm (GPT-2) or rmsnorm (Llama)
    model.norm_eps = 1e-5  # epsilon of every norm
    model.mlp = "gelu"  # gelu (GPT-2's 4x tanh-GELU MLP) or swiglu (Llama)
    model.mlp_hidden = 0  # MLP width; 0: 4*n_embd (gelu) or 8/3*n_embd rounded up to 64 (swiglu)
    model.scan_layers = False  # nn.scan over stacked blocks: compile time independent of depth
    model.dtype = "float32"  # compute dtype: float32 or bfloat16 (parameters stay param_dtype)
    model.param_dtype = "float32"  # storage dtype of parameters and optimizer state
    model.attention = "auto"  # auto (gptlab/perf.py picks for the machine), xla, cudnn (NVIDIA GPUs),
    # explicit (einsum) or blocked (causal query blocks, gptlab/blocked_attention.py)
    model.remat = "none"  # activation rematerialisation: none, full, dots or dots_all
    model.dense_backward = "auto"  # kernel gradients: auto (narrow_transpose on CPUs), xla or narrow_transpose

    config.data = data = config_dict.ConfigDict()
    data.dataset = "python_stdlib"  # python_stdlib, python_stdlib_docstrings (prose), text_folder or any TFDS catalog name (tiny_shakespeare, lm1b, ...)
    data.text_key = "text"  # the feature holding the text
    data.data_dir = config_dict.placeholder(str)  # where TFDS prepares data; None: ~/tensorflow_datasets
    data.manual_dir = config_dict.placeholder(str)  # where a catalog builder finds files it cannot download
    data.text_dir = config_dict.placeholder(str)  # the folder of text files, for dataset=text_folder
    data.text_glob = "**/*"  # which files under data.text_dir, for dataset=text_folder
    data.encoding = "utf-8"  # python_stdlib/text_folder: the files' text encoding (e.g. latin-1, cp1252)
    data.decode_errors = "strict"  # bytes that do not decode: strict (refuse, naming file and byte) or replace (U+FFFD, counted)
    data.include = ()  # python_stdlib/text_folder: keep files whose path matches one of these globs
    data.exclude = PRETRAIN_EXCLUDE  # ... then drop files matching any of these (test/ and the held-out packages)
    data.tokenizer = "byte"  # byte (nothing to train), char, sentencepiece (both trained on train_split) or gpt2
    data.sentencepiece_type = "bpe"  # data.tokenizer=sentencepiece: bpe or unigram
    data.sentencepiece_vocab_size = 8192  # data.tokenizer=sentencepiece: pieces incl. 256 bytes and specials
    data.tokenizer_train_chars = 200_000_000  # data.tokenizer=sentencepiece trains on at most this many characters
    data.gpt2_encoding_file = config_dict.placeholder(str)  # data.tokenizer=gpt2: r50k_base.tiktoken; None: tiktoken cache
    data.cache_dir = config_dict.placeholder(str)  # token cache (memory-mapped); None: DATA_DIR/gptlab_token_cache
    data.shift_windows = False  # move the window grid by a seeded random offset each epoch (nanoGPT-like crops)
    data.batch_size = 16  # global batch size in sequences (all devices, all accumulation steps)
    data.seq_len = config_dict.placeholder(int)  # training window length; None: model.block_size
    data.train_split = "train"  # the split to train on
    data.train_fraction = 1.0  # train on the first fraction of train_split's tokens, e.g. 0.01 (data-size ablations)
    data.eval_split = "validation"  # the split eval_loss is measured on: every choice (early stopping, best checkpoint)
    data.test_split = "test"  # the best checkpoint is scored here at the end, for reporting only; None: not at all
    data.prefetch = config_dict.placeholder(int)  # batches read ahead by a background thread; 0: off; None: auto

    config.optimizer = opt = config_dict.ConfigDict()
    opt.learning_rate = 2e-3  # peak learning rate, reached after warmup
    opt.min_learning_rate = 2e-4  # floor of the cosine decay
    opt.warmup_steps = 50  # linear warmup from 0 to the peak
    opt.decay_steps = config_dict.placeholder(int)  # cosine reaches the floor here; None: train.num_steps
    opt.b1 = 0.9  # AdamW first-moment decay
    opt.b2 = 0.99  # AdamW second-moment decay
    opt.eps = 1e-8  # AdamW denominator epsilon
    opt.weight_decay = 0.1  # decoupled weight decay, on parameters matched by weight_decay_on
    opt.weight_decay_on = (r".*/kernel",)  # regexes (fullmatch, '/'-joined paths): matrices only
    opt.grad_clip_norm = 1.0  # clip gradients to this global norm; 0 disables

    config.train = train = config_dict.ConfigDict()
    train.num_steps = 600  # optimizer steps
    train.log_every = 25  # steps between logged training metrics
    train.eval_every = 200  # steps between evaluations (and one at the end)
    train.eval_batches = 10  # fixed validation batches per evaluation
    train.test_batches = config_dict.placeholder(int)  # fixed test batches the best checkpoint is scored on; None: eval_batches;
    # -1: the whole test split (sft, classify: every example once; lm: as many windows as its tokens fill)
    train.checkpoint_every = 200  # steps between checkpoints (and one at the end)
    train.early_stopping_patience = 0  # stop after this many evaluations without a better selection_metric; 0: off
    train.early_stopping_min_delta = 0.0  # an evaluation must beat the last improvement by more than this to count
    train.selection_metric = "eval_loss"  # validation metric that picks the best checkpoint (eval_loss, eval_accuracy, ...)
    train.eval_at_start = False  # evaluate the starting model (step 0) too, as a best-checkpoint candidate
    train.grad_accum_steps = 1  # micro-batches per step; batch_size must divide evenly
    train.peak_tflops = config_dict.placeholder(float)  # device peak for MFU; None: known-device table
    train.skip_nonfinite_steps = False  # skip updates with a non-finite gradient instead of stopping
    train.max_nonfinite_in_a_row = 10  # with skipping: stop after this many non-finite steps in a row
    train.compilation_cache_dir = config_dict.placeholder(str)  # JAX persistent compilation cache; None: off
    train.progress_every_s = 30.0  # when stderr is no terminal: seconds between progress lines (a bar otherwise)
    train.profile_steps = ()  # (first, last): write a jax.profiler trace of these steps; (): none
    train.profile_dir = config_dict.placeholder(str)  # where the trace goes; None: WORKDIR/profile

    config.parallel = par = config_dict.ConfigDict()
    par.mode = "jit"  # jit (device mesh: data parallel + FSDP) or pmap (classic data parallel)
    par.mesh = (-1, 1)  # jit: (data, fsdp) mesh shape; data=-1 takes the devices fsdp leaves
    par.cpu_devices = config_dict.placeholder(int)  # XLA CPU devices the batch is split over; None: auto
    # keep freed memory for the next step instead of unmapping it (glibc); None: auto (on for CPU-only JAX
    # while the compiled train step's temporaries are at most 256 MB a device)
    par.cpu_reuse_memory = config_dict.placeholder(bool)
    # library for the train/eval steps' CPU matmuls: "onednn" (built into jaxlib) or "xla" (XLA's own); None: auto (oneDNN on Intel)
    par.cpu_matmuls = config_dict.placeholder(str)
    par.coordinator_address = config_dict.placeholder(str)  # multi-host: "host:port" of process 0
    par.num_processes = config_dict.placeholder(int)  # multi-host: how many processes in all
    par.process_id = config_dict.placeholder(int)  # multi-host: this process's index, 0..num_processes-1
    par.initialization_timeout = 300  # multi-host: seconds to wait for every process to join

    config.wandb = wandb = config_dict.ConfigDict()  # Weights & Biases logging: pip install -e ".[wandb]"
    wandb.project = config_dict.placeholder(str)  # W&B project to log to; None: W&B off
    wandb.name = config_dict.placeholder(str)  # the W&B run's name; None: the workdir's name
    wandb.entity = config_dict.placeholder(str)  # W&B team or user; None: your default
    wandb.mode = config_dict.placeholder(str)  # online, offline (sync later with `wandb sync`); None: $WANDB_MODE

    config.checkpoint = ckpt = config_dict.ConfigDict()
    ckpt.max_to_keep = 3  # most recent checkpoints kept on disk
    ckpt.async_save = True  # write checkpoints in the background while training continues
    ckpt.fallback_on_corruption = False  # resume from the previous checkpoint if the latest is damaged

    if preset == "tiny":
        model.n_layer, model.n_head, model.n_embd, model.block_size = 2, 2, 64, 64
        data.batch_size = 8
        data.include = ("[a-c]*",)  # modules and packages starting a-c, minus the held-out ones: 1.0 MB, prepared in a second
        opt.learning_rate, opt.min_learning_rate, opt.warmup_steps = 3e-3, 3e-4, 5
        train.num_steps, train.log_every, train.eval_every, train.eval_batches = 40, 5, 20, 2
        train.checkpoint_every = 20
    elif preset == "small":
        pass  # the defaults above
    elif preset == "small_llama":
        model.n_kv_head = 2
        model.bias, model.position, model.norm, model.mlp = False, "rope", "rmsnorm", "swiglu"
    elif preset in ("gpt2_124m", "smollm2_135m"):  # GPU runs: bf16 compute, cuDNN attention, GPT-2's schedule
        model.dtype = "bfloat16"
        model.attention = "cudnn"
        data.batch_size = 32
        opt.learning_rate, opt.min_learning_rate, opt.warmup_steps = 6e-4, 6e-5, 700
        opt.b2 = 0.95
        train.num_steps, train.log_every, train.eval_every, train.eval_batches = 20000, 50, 1000, 20
        train.checkpoint_every = 1000
        if preset == "gpt2_124m":
            model.n_layer, model.n_head, model.n_embd, model.block_size = 12, 12, 768, 1024
            model.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 128 for fast matmuls
        else:  # HuggingFaceTB/SmolLM2-135M's config.json
            model.n_layer, model.n_head, model.n_kv_head, model.n_embd, model.block_size = 30, 9, 3, 576, 2048
            model.bias, model.position, model.norm, model.mlp = False, "rope", "rmsnorm", "swiglu"
            model.mlp_hidden, model.rope_theta, model.scan_layers = 1536, 100000.0, True
            model.vocab_size = 49152  # SmolLM2's vocabulary, so the count is its 134.5M (byte tokens pad it)
            opt.learning_rate, opt.min_learning_rate = 3e-3, 3e-4  # SmolLM2's peak learning rate
    elif preset in ("shakespeare_char", "shakespeare_char_cpu"):
        # nanoGPT's config/train_shakespeare_char.py ("baby GPT"), field for field.
        model.n_layer, model.n_head, model.n_embd, model.block_size = 6, 6, 384, 256
        model.dropout = 0.2
        model.bias = False  # nanoGPT's default
        model.dtype = "bfloat16"  # nanoGPT autocasts to bfloat16 where supported
        data.dataset, data.tokenizer = "tiny_shakespeare", "char"
        data.include, data.exclude = (), ()
        data.eval_split = "validation+test"  # TFDS's last 5% + 5% = nanoGPT's val.bin, the last 10%
        data.test_split = None  # nanoGPT's val.bin already holds the test split
        data.shift_windows = True  # nanoGPT samples windows at random offsets
        data.batch_size = 64
        opt.learning_rate, opt.min_learning_rate, opt.warmup_steps = 1e-3, 1e-4, 100
        opt.b1, opt.b2, opt.weight_decay, opt.grad_clip_norm = 0.9, 0.99, 0.1, 1.0
        # nanoGPT decays every parameter with 2+ dimensions: matrices and both embeddings.
        opt.weight_decay_on = (r".*/kernel", r"wte/embedding", r"wpe/embedding")
        train.num_steps, train.log_every, train.eval_every, train.eval_batches = 5000, 10, 250, 200
        train.checkpoint_every = 500
        if preset == "shakespeare_char_cpu":  # nanoGPT README's run on a CPU
            model.n_layer, model.n_head, model.n_embd, model.block_size = 4, 4, 128, 64
            model.dropout = 0.0
            model.dtype = "float32"
            data.batch_size = 12
            train.num_steps, train.log_every, train.eval_batches = 2000, 50, 20
    else:
        raise ValueError(f"unknown preset {preset!r}: choose tiny, small, small_llama, gpt2_124m, smollm2_135m, "
                         "shakespeare_char or shakespeare_char_cpu")

    config.lock()
    return config
