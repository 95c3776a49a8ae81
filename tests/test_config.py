"""Config parsing as users meet it: any override is either a valid run config or one clear line."""
import pytest
from absl import flags
from hypothesis import given, settings, strategies as st
from ml_collections import config_flags

from conftest import REPO
from gptlab import experiment as experiment_lib
from gptlab.errors import UserError

INT_FIELDS = ["model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size",
              "data.batch_size", "data.seq_len", "train.num_steps", "train.log_every", "train.eval_every",
              "train.eval_batches", "train.checkpoint_every", "train.grad_accum_steps", "seed",
              "optimizer.warmup_steps"]
FLOAT_FIELDS = ["model.dropout", "optimizer.learning_rate", "optimizer.min_learning_rate", "optimizer.weight_decay"]


def parse(*overrides):
    argv = ["prog", f"--config={REPO / 'configs' / 'pretrain.py'}:tiny", *overrides]
    values = flags.FlagValues()
    # Override flags are registered from the command line the config flag is defined with.
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(INT_FIELDS), value=st.integers(-(2**40), 2**40))
def test_any_integer_override_is_valid_or_refused_with_the_field_named(field, value):
    config = parse(f"--config.{field}={value}")
    try:
        experiment_lib.check_train_config(config)
    except UserError as e:
        message = str(e)
        assert "\n" not in message and field.split(".")[-1] in message, message


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(FLOAT_FIELDS), value=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_any_float_override_is_valid_or_refused_with_the_field_named(field, value):
    config = parse(f"--config.{field}={value!r}")
    try:
        experiment_lib.check_train_config(config)
    except UserError as e:
        assert "\n" not in str(e) and field.split(".")[-1] in str(e), str(e)


def test_nested_overrides_apply_and_unknown_or_mistyped_ones_fail():
    config = parse("--config.train.num_steps=7", "--config.model.n_layer=3", "--config.data.exclude=('x/*',)")
    assert (config.train.num_steps, config.model.n_layer, config.data.exclude) == (7, 3, ("x/*",))
    with pytest.raises(Exception, match="num_steps"):
        parse("--config.train.num_stepz=5")
    with pytest.raises(flags.IllegalFlagValueError):
        parse("--config.train.num_steps=five")
