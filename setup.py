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
    packages=setuptools.find_packages(include=["gptlab", "gptlab.*", "configs", "configs.*", "experiments"]),
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
        "tensorboardX>=2.6",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
    },
)
