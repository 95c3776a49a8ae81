"""Harness scoring time of gptlab_next_line_mc (100 items, 400 requests): --model gptlab vs --model hf.

    python -m experiments.convert --workdir=RUN --to_hf=HF_DIR
    HF_DATASETS_OFFLINE=1 python dev/harness_timing.py RUN HF_DIR gptlab 16
    HF_DATASETS_OFFLINE=1 python dev/harness_timing.py RUN HF_DIR hf 16

Scores the task twice in one process (the first includes gptlab's compilation) and prints
the seconds of each, the accuracies and, in timing_WHICH.json, every item's log-likelihoods.
"""
import json
import pathlib
import sys
import time

import lm_eval
from lm_eval.tasks import TaskManager

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gptlab import eval_harness  # noqa: E402

workdir, hf_dir, which, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
manager = TaskManager(include_path=str(REPO / "gptlab" / "eval_tasks"), include_defaults=False)
start = time.perf_counter()
if which == "gptlab":
    lm = eval_harness.GptlabLM(workdir=workdir, batch_size=batch_size)
else:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=hf_dir, tokenizer=eval_harness.hf_byte_tokenizer(), batch_size=batch_size, device="cpu")
load, times = time.perf_counter() - start, []
for _ in range(2):
    start = time.perf_counter()
    result = lm_eval.simple_evaluate(model=lm, tasks=["gptlab_next_line_mc"], task_manager=manager, log_samples=True)
    times.append(time.perf_counter() - start)
scores = result["results"]["gptlab_next_line_mc"]
items = [[r[0][0] for r in s["resps"]] for s in result["samples"]["gptlab_next_line_mc"]]
pathlib.Path(f"timing_{which}.json").write_text(json.dumps({"which": which, "load_s": load, "times_s": times,
                                                             "acc": scores["acc,none"], "log_likelihoods": items}))
print(f"{which}: load {load:.2f} s, scoring {times[0]:.2f} s then {times[1]:.2f} s, "
      f"acc {scores['acc,none']:.2f}, acc_norm {scores['acc_norm,none']:.2f}")
