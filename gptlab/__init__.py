"""gptlab: pretrain and fine-tune GPT language models with JAX, Flax, Optax and Orbax."""
