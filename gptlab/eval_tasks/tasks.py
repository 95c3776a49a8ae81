"""Loads the JSONL files next to this file for the YAML tasks here (lm-eval `custom_dataset`).

A path in a task's `dataset_kwargs.data_files` is resolved against cwd by `datasets`; this
loader resolves it against this folder, so `--include_path gptlab/eval_tasks` works from
anywhere. Nothing is downloaded.
"""
import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def load_jsonl(data_files: dict = None, **unused):
    """{split: datasets.Dataset} from {split: file name in this folder (or an absolute path)}."""
    import datasets

    splits = {}
    for split, name in (data_files or {}).items():
        path = HERE / name
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
