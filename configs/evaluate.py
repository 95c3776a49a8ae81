"""Evaluating a trained model: loss, perplexity and bits per byte on a split.

    python -m experiments.evaluate --workdir=/tmp/run [--step=best] [--config.data.eval_split=test]

The checkpoint is the entry point's `--step` flag (as for sample, compare, convert and chat).

Every `data` field left unset (None) is the run's own, read from its checkpoint, so
the default evaluates the run's validation split with its tokenizer and window
length. Set a field to evaluate elsewhere, e.g. another corpus:
`--config.data.dataset=text_folder --config.data.text_dir=/path/to/text`.
"""
from ml_collections import config_dict


def get_config(preset: str = "") -> config_dict.ConfigDict:
    del preset  # one configuration; kept for the `file.py:preset` syntax
    config = config_dict.ConfigDict()
    config.num_batches = config_dict.placeholder(int)  # evaluate this many batches; None: the whole split

    config.data = data = config_dict.ConfigDict()
    data.eval_split = config_dict.placeholder(str)  # the split to evaluate; None: the run's data.eval_split
    data.batch_size = config_dict.placeholder(int)  # windows per batch; None: the run's data.batch_size
    data.seq_len = config_dict.placeholder(int)  # window length; None: the run's data.seq_len
    data.dataset = config_dict.placeholder(str)  # None: the run's dataset
    data.text_key = config_dict.placeholder(str)  # the feature holding the text; None: the run's
    data.data_dir = config_dict.placeholder(str)  # where TFDS keeps prepared data; None: the run's
    data.manual_dir = config_dict.placeholder(str)  # None: the run's
    data.text_dir = config_dict.placeholder(str)  # for dataset=text_folder; None: the run's
    data.text_glob = config_dict.placeholder(str)  # for dataset=text_folder; None: the run's
    data.include = config_dict.placeholder(tuple)  # path globs to keep; None: the run's
    data.exclude = config_dict.placeholder(tuple)  # path globs to drop; None: the run's
    data.gpt2_encoding_file = config_dict.placeholder(str)  # GPT-2 BPE file, for gpt2-tokenizer runs; None: the run's
    config.lock()
    return config
