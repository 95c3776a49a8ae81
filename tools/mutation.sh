#!/usr/bin/env bash
# Mutation score (mutmut 3) of the code whose numbers users publish: LoRA, the strategy masks, the loss
# and its masks, selection and early stopping, the evaluation metrics, the study's statistics. Each
# mutant is one small change to one function (an operator, a constant, a dropped argument); the fast
# tests below that reach that function run against it, and a mutant no test fails on "survived".
# Dev tooling, not CI: about an hour on 2 shared cores for everything; pass module names to run fewer.
#
#   pip install "mutmut>=3.8"
#   nice -n 10 bash tools/mutation.sh                    # every module below
#   nice -n 10 bash tools/mutation.sh transfer selection # some of them
#   (cd .mutation && mutmut results)                     # survivors; `mutmut show NAME` prints one's diff
#
# The work happens in .mutation/ (git-ignored): a copy of the sources with a generated setup.cfg, so
# mutmut's mutants/ folder never lands in the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${MUTATION_DIR:-.mutation}

# module -> the functions mutated (mutmut's names: gptlab.MODULE.x_FUNCTION, gptlab.MODULE.xǁCLASSǁMETHOD).
declare -A FUNCTIONS=(
  [lora]="gptlab.lora.*"
  [adapt]="gptlab.adapt.x__selects* gptlab.adapt.x_trainable_mask* gptlab.adapt.x_optimizer*"
  [optim]="gptlab.optim.x_match_mask* gptlab.optim.x_path_str* gptlab.optim.x_param_paths*"
  [train]="gptlab.train.x_lm_loss_fn* gptlab.train.x_metrics_from_sums* gptlab.train.x_macro_f1*"
  [finetune]="gptlab.finetune.x_classify_loss_fn*"
  [supervised]="gptlab.data.supervised.x_encode_sft* gptlab.data.supervised.x_encode_classify*"
  [selection]="gptlab.selection.*"
  [evaluate]="gptlab.evaluate.x_token_stream* gptlab.evaluate.x_windows* gptlab.evaluate.x_lm_metrics* gptlab.evaluate.x_sft_metrics* gptlab.evaluate.x_parses_as_python* gptlab.evaluate.x_classify_metrics*"
  [transfer]="gptlab.transfer.*"
  [report]="gptlab.report.x_choose* gptlab.report.x_mean_std* gptlab.report.x_metric_value* gptlab.report.x_validation_value*"
  [study]="gptlab.study.x_pareto* gptlab.study.xǁStudyǁgain_share* gptlab.study.xǁStudyǁchoose* gptlab.study.xǁChoiceǁvalues* gptlab.study.xǁChoiceǁinterval*"
)
ORDER=(transfer selection report study train supervised lora optim adapt finetune evaluate)
# The quick tests that reach those functions (mutmut runs, for each mutant, only those that reach its function).
TESTS=(tests/test_independent_answers.py tests/test_transfer.py tests/test_protocol.py::test_early_stopping_stops_at_the_expected_evaluation
       tests/test_protocol.py::test_macro_f1_against_hand_computed_values tests/test_protocol.py::test_report_selects_on_validation_never_on_test
       tests/test_study.py::test_learning_rate_is_chosen_on_validation_not_test tests/test_study.py::test_effective_data_of_the_study_recovers_the_known_answer
       tests/test_study.py::test_share_of_full_fine_tunings_gain_is_per_seed tests/test_study.py::test_paired_comparisons_and_conclusions_say_what_held
       tests/test_study.py::test_pareto_front tests/test_finetune.py::test_each_strategy_trains_exactly_its_parameters
       tests/test_finetune.py::test_bad_strategy_settings_are_one_line_user_errors tests/test_finetune.py::test_sft_loss_weights_cover_exactly_the_response
       tests/test_finetune.py::test_lora_starts_equal_and_its_merged_export_reproduces_the_adapted_model
       tests/test_finetune.py::test_strategies_ask_the_model_so_they_hold_for_a_llama_style_model)

modules=("$@")
[[ ${#modules[@]} -gt 0 ]] || modules=("${ORDER[@]}")
patterns=()
for m in "${modules[@]}"; do
  [[ -n "${FUNCTIONS[$m]:-}" ]] || { echo "unknown module $m: choose from ${ORDER[*]}" >&2; exit 2; }
  read -ra p <<< "${FUNCTIONS[$m]}"
  patterns+=("${p[@]}")
done
files=()
for m in "${ORDER[@]}"; do
  [[ $m == supervised ]] && files+=("gptlab/data/supervised.py") || files+=("gptlab/$m.py")
done

mkdir -p "$WORK"
# Fresh sources each time; mutmut keeps its results in mutants/ and reruns only what changed.
(cd "$WORK" && rm -rf gptlab configs experiments tests pytest.ini)
cp -r gptlab configs experiments tests pytest.ini "$WORK/"
{
  echo "[mutmut]"
  echo "source_paths = gptlab/"
  printf "only_mutate =\n"; printf "    %s\n" "${files[@]}"
  printf "also_copy =\n    configs/\n    experiments/\n    pytest.ini\n"
  printf "pytest_add_cli_args =\n    -p\n    no:xdist\n    -m\n    not slow\n    -q\n"
  printf "pytest_add_cli_args_test_selection =\n"; printf "    %s\n" "${TESTS[@]}"
  # Not fork-safe: JAX's runtime threads; a fork server imports the tests once, then forks before any runs.
  echo "process_isolation = forkserver"
} > "$WORK/setup.cfg"
cd "$WORK"
mutmut run --max-children "${MUTATION_JOBS:-2}" "${patterns[@]}"
mutmut results --all true | grep -v ": killed$" || true
