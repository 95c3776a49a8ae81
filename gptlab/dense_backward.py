"""`model.dense_backward`: how dense layers compute their kernel gradient.

"xla": as XLA decides. "narrow_transpose": a custom VJP that avoids XLA CPU's
transposed writes of the wide output gradient (faster on CPUs, measured by
experiments.benchmark). The model takes the chosen `dot_general` from outside
(`GPT(cfg, dot_general=...)`); `gptlab.experiment.training_model` makes the choice.
"""
import jax
import jax.numpy as jnp

from gptlab.errors import UserError


@jax.custom_vjp
def _matmul_narrow_transpose(x, kernel):
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals, grad):
    x, kernel = residuals
    rows_x, rows_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    # The kernel gradient contracts over the rows of both. XLA's CPU dot would rewrite the
    # (wide) output gradient transposed, inside its elementwise producer (GELU's backward),
    # which is the slowest part of the CPU backward pass; transposing the narrower operand
    # explicitly, behind a barrier so XLA cannot fold it back into the dot, is cheaper.
    if rows_x.shape[1] <= rows_grad.shape[1]:
        kernel_grad = jnp.dot(jax.lax.optimization_barrier(rows_x.T), rows_grad)
    else:  # the gradient is the narrower one: transpose it, and the small result back
        kernel_grad = jnp.dot(jax.lax.optimization_barrier(rows_grad.T), rows_x).T
    return jnp.dot(grad, kernel.T), kernel_grad.astype(kernel.dtype)


_matmul_narrow_transpose.defvjp(_matmul_fwd, _matmul_bwd)


def dot_narrow_transpose(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A `dot_general` for nn.Dense (x @ kernel) whose backward pass uses `_matmul_bwd`."""
    del dimension_numbers, precision, preferred_element_type  # nn.Dense's: contract x's last axis with kernel's first
    return _matmul_narrow_transpose(lhs, rhs)


DENSE_DOTS = {"xla": None, "narrow_transpose": dot_narrow_transpose}


def dot_general(name: str):
    """The `dot_general` for `GPT(cfg, dot_general=...)` that `model.dense_backward=name` selects."""
    if name not in DENSE_DOTS:
        raise UserError(f"model.dense_backward={name!r} is not one of {tuple(DENSE_DOTS)}")
    return DENSE_DOTS[name]
