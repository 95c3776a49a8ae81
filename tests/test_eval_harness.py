"""gptlab as an lm-evaluation-harness model: request semantics, offline tasks, and the same numbers as `--model hf`."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, needs

lm_eval = needs("lm_eval", "eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gptlab import convert, eval_harness  # noqa: E402
from gptlab import model as model_lib  # noqa: E402
from gptlab.errors import UserError  # noqa: E402
from configs import pretrain as pretrain_config

BASE_CONFIG = pretrain_config.get_config("small")  # what experiments.convert passes

TOLERANCE = 1e-4  # per-item log-likelihoods, float32 in both paths
TASKS = REPO / "gptlab" / "eval_tasks"
CFG = model_lib.GPTConfig(vocab_size=257, block_size=128, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny byte-level model with weights scaled up from the init, so its predictions are peaked:
    greedy decoding then has clear winners, and both paths must pick the same ones."""
    directory = tmp_path_factory.mktemp("harness") / "run"
    params = jax.tree.map(lambda p: p * 4, model_lib.init_params(CFG, jax.random.key(0)))
    convert.save_workdir(directory, params, convert.run_config(CFG, "byte", BASE_CONFIG), {"kind": "byte"}, source="test")
    return directory


@pytest.fixture(scope="module")
def lm(run_dir):
    return eval_harness.GptlabLM(workdir=str(run_dir), batch_size=4)


def write_tasks(directory: pathlib.Path) -> pathlib.Path:
    """Three local tasks over JSONL files (lm-eval's `dataset_path: json`): multiple choice, generation, perplexity."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = {
        "mc": [{"context": f"x = {i}\ny = x + ", "choices": [f"{i}\n", "1\n", "z * 2\n", "'a'\n"], "label": i % 4}
               for i in range(6)],
        "gen": [{"context": f"def f{i}(a):\n    return", "target": " a"} for i in range(5)],
        # Longer than the context (128 bytes): several rolling windows per document.
        "text": [{"text": "import os\n" * (3 + 9 * i) + "print('done')\n"} for i in range(3)],
    }
    for name, items in rows.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    head = lambda task, name: (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                               f"    test: {directory / name}.jsonl\ntest_split: test\nmetadata:\n  version: 1.0\n")
    (directory / "mc.yaml").write_text(head("t_mc", "mc") + (
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    (directory / "gen.yaml").write_text(head("t_gen", "gen") + (
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        "target_delimiter: ''\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))
    (directory / "text.yaml").write_text(head("t_text", "text") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))
    return directory


def evaluate(model, tasks_dir, tasks, **kwargs):
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True, **kwargs)


def direct_log_probs(lm, tokens) -> np.ndarray:
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one forward pass of the model (no harness)."""
    logits = model_lib.GPT(CFG).apply({"params": lm.params}, np.asarray([tokens[:-1]], np.int32))[0]
    log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return np.asarray([log_probs[i, t] for i, t in enumerate(tokens[1:])])


def test_loglikelihood_scores_the_continuation_only_batched_or_not(lm):
    requests = [Instance("loglikelihood", {}, ("def f(x):\n", "    return x"), 0),
                Instance("loglikelihood", {}, ("a", "b"), 1),
                Instance("loglikelihood", {}, ("", "hello"), 2),  # empty context: the end-of-text token
                Instance("loglikelihood", {}, ("x" * 300, " = 1"), 3)]  # left-truncated to the context
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    expected = []
    for context, continuation in (r.args for r in requests):
        # lm-eval moves the context's trailing whitespace into the continuation (as for its hf model).
        moved = len(context) - len(context.rstrip())
        context, continuation = context[:len(context) - moved], context[len(context) - moved:] + continuation
        ctx = list(context.encode()) or [256]
        whole = (ctx + list(continuation.encode()))[-(CFG.block_size + 1):]
        expected.append(direct_log_probs(lm, whole)[-len(continuation.encode()):].sum())
    np.testing.assert_allclose([s for s, _ in scores], expected, atol=TOLERANCE)
    one_by_one = eval_harness.GptlabLM(workdir=str(lm.run.loaded.directory.parents[1]), batch_size=1)
    np.testing.assert_allclose([s for s, _ in one_by_one.loglikelihood(requests, disable_tqdm=True)],
                               [s for s, _ in scores], atol=1e-5)


def test_loglikelihood_rolling_scores_every_token_once(lm):
    short, long = "def f():\n    pass\n", "import os\n" * 40  # 400 bytes: 4 windows of the 128-token context
    (total_short, total_long) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (short,), 0), Instance("loglikelihood_rolling", {}, (long,), 1)],
        disable_tqdm=True)
    np.testing.assert_allclose(total_short, direct_log_probs(lm, [256] + list(short.encode())).sum(), atol=TOLERANCE)
    # The long text: the windows lm-eval defines, each predicting its tokens from as long a context as fits.
    tokens, expected = list(long.encode()), 0.0
    for context, continuation in map(lm_eval.utils.make_disjoint_window, lm_eval.utils.get_rolling_token_windows(
            tokens, 256, CFG.block_size, 1)):
        expected += direct_log_probs(lm, context + continuation)[-len(continuation):].sum()
    np.testing.assert_allclose(total_long, expected, atol=TOLERANCE)
    assert total_long < total_short < 0


def test_generate_until_stops_at_stop_strings_and_max_gen_toks(lm):
    prompts = ["def f(a):\n    return", "x = 1\n", "import"]
    free = lm.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 40}), i)
                              for i, p in enumerate(prompts)], disable_tqdm=True)
    assert all(len(text) <= 40 for text in free) and max(map(len, free)) > 3  # bytes: at most one character each
    stop = next(c for c in free[0][2:] if c.isascii() and c.isprintable())  # one the model does generate
    cut = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": 40}), 0)],
                            disable_tqdm=True)[0]
    assert cut == free[0][:free[0].index(stop)]
    short = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [], "max_gen_toks": 3}), 0)],
                              disable_tqdm=True)[0]
    assert free[0].startswith(short) and len(short) <= 3
    with pytest.raises(UserError, match="max_gen_toks=128 must be less than"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"until": [], "max_gen_toks": 128}), 0)],
                          disable_tqdm=True)


def test_model_args_are_checked(run_dir):
    from lm_eval.api.registry import get_model

    assert get_model("gptlab") is eval_harness.GptlabLM
    with pytest.raises(UserError, match="workdir=DIR"):
        eval_harness.GptlabLM()
    with pytest.raises(UserError, match=r"\['temperature'\] are not arguments"):
        eval_harness.GptlabLM.create_from_arg_string(f"workdir={run_dir},temperature=1")
    with pytest.raises(UserError, match="max_length=500"):
        eval_harness.GptlabLM(workdir=str(run_dir), max_length=500)


@pytest.mark.slow  # loads and runs 200 shipped items' tasks: CI's full suite runs it
def test_shipped_tasks_load_offline_and_run(lm, no_network):
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    loaded = manager.load(["gptlab_next_line_mc", "gptlab_next_line"])["tasks"]
    docs = {name: list(task.test_docs()) for name, task in loaded.items()}
    assert sorted(len(d) for d in docs.values()) == [100, 100]
    results = lm_eval.simple_evaluate(model=lm, tasks=["gptlab_next_line_mc", "gptlab_next_line"],
                                      task_manager=manager, limit=3)["results"]
    assert 0 <= results["gptlab_next_line_mc"]["acc,none"] <= 1
    assert 0 <= results["gptlab_next_line"]["exact_match,none"] <= 1


def test_gptlab_gives_the_numbers_of_the_hf_reference_path(run_dir, tmp_path, no_network):
    """The same model through --model gptlab and, exported with experiments.convert --to_hf, through --model hf."""
    needs("torch", "bench")
    needs("accelerate", "eval")
    from lm_eval.models.huggingface import HFLM

    tasks_dir, tasks = write_tasks(tmp_path / "tasks"), ["t_mc", "t_gen", "t_text"]
    ours = evaluate("gptlab", tasks_dir, tasks, model_args=f"workdir={run_dir}", batch_size=4)
    convert.to_hf(run_dir, tmp_path / "hf", log=lambda *_: None)
    reference = evaluate(HFLM(pretrained=str(tmp_path / "hf"), tokenizer=eval_harness.hf_byte_tokenizer(),
                              batch_size=1, device="cpu"), tasks_dir, tasks)
    worst = {}
    for task in tasks:
        for a, b in zip(ours["samples"][task], reference["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            if task == "t_gen":
                assert a["resps"] == b["resps"]  # the same generated text, item by item
                continue
            mine = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in a["resps"]]
            theirs = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in b["resps"]]
            # A document's rolling total sums hundreds of tokens: float32's relative error of the sum counts too.
            np.testing.assert_allclose(mine, theirs, atol=TOLERANCE, rtol=1e-6 if task == "t_text" else 0)
            worst[task] = max(worst.get(task, 0.0), float(np.max(np.abs(np.subtract(mine, theirs)))))
    for task, metric in (("t_mc", "acc,none"), ("t_mc", "acc_norm,none"), ("t_gen", "exact_match,none")):
        assert ours["results"][task][metric] == reference["results"][task][metric]
    print(f"\nharness gptlab vs hf: largest per-item log-likelihood difference {worst}")


def test_hf_byte_tokenizer_is_gptlabs_byte_tokenizer():
    needs("transformers", "bench")
    from gptlab import tokenizers

    hf, ours = eval_harness.hf_byte_tokenizer(), tokenizers.ByteTokenizer()
    for text in ("def f(x):\n    return x  # é ✓", "  two spaces", "tab\tend"):
        assert hf.encode(text) == ours.encode(text).tolist()
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (len(hf), hf.eos_token_id, hf.bos_token_id) == (257, 256, 256)


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_gptlab_model(run_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.lm_eval", "--model", "gptlab", "--model_args", f"workdir={run_dir}",
         "--tasks", "gptlab_next_line_mc", "--limit", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                    "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gptlab_next_line_mc" in result.stdout
    from gptlab import eval_scores

    assert set(eval_scores.lm_eval_scores(run_dir)["gptlab_next_line_mc"]) == {"acc", "acc_norm"}


def test_wrapper_sends_gptlab_results_to_the_workdir_where_eval_scores_finds_them(tmp_path):
    from experiments import lm_eval as wrapper
    from gptlab import eval_scores

    argv = ["--model", "gptlab", "--model_args", f"step=best,workdir={tmp_path}", "--tasks", "x"]
    assert wrapper._gptlab_workdir(argv) == str(tmp_path)
    assert wrapper._gptlab_workdir(["--model=hf", "--model_args=pretrained=gpt2"]) is None
    results = tmp_path / "lm_eval" / "model" / "results_2026-01-01T00-00-00.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"results": {"t_mc": {"alias": "t_mc", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                                        "sample_len": 6}}}))
    newer = results.with_name("results_2026-02-01T00-00-00.json")
    newer.write_text(json.dumps({"results": {"t_mc": {"acc,none": 0.75}}}))
    assert eval_scores.read(tmp_path) == {"lm_eval": {"t_mc": {"acc": 0.75}}}


def test_a_hugging_face_tokenizer_can_stand_in_for_the_runs_own(run_dir, lm, monkeypatch):
    """tokenizer=DIR_OR_ID (for imported models whose tokenizer gptlab does not run) scores through it."""
    transformers = needs("transformers", "bench")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, source: eval_harness.hf_byte_tokenizer()))
    other = eval_harness.GptlabLM(workdir=str(run_dir), tokenizer="some/tokenizer", batch_size=4)
    requests = [Instance("loglikelihood", {}, ("def f(x):", "\n    return x  # é"), 0)]
    assert other.tokenizer_name == "gptlab-huggingface" and other.eot_token_id == 256
    np.testing.assert_allclose(other.loglikelihood(requests, disable_tqdm=True)[0][0],
                               lm.loglikelihood(requests, disable_tqdm=True)[0][0], atol=1e-6)
