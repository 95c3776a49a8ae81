#!/usr/bin/env bash
# Mutation score (mutmut 3) of the code whose numbers users publish: LoRA, the strategy masks, the loss
# and its masks, selection and early stopping, the evaluation metrics, the study's statistics. Each
# mutant is one small change to one function (an operator, a constant, an argument dropped); the quick
# tests that reach that function run against it, and a mutant none of them fails on "survived".
# (PEFT's comparison, test_lora_computes_what_peft_computes_on_the_same_weights, is left out: a minute of
# importing torch a mutant.) Dev tooling, not CI. Three groups, each with its own fast test selection and work folder:
#   statistics (transfer, selection, report, study: pure numpy, seconds a mutant)
#   model      (lora, adapt, optim, the losses, supervised masks, evaluate: JAX, tens of seconds a mutant)
#   lora       (lora alone, with its four tests: the quickest score of the transform users publish most)
#
#   pip install "mutmut>=3.8"         # in the project's virtual environment, which must be active
#   nice -n 10 bash dev/mutation.sh                 # statistics, then model (which includes lora)
#   nice -n 10 bash dev/mutation.sh statistics      # one group; a further argument keeps only those mutants
#   nice -n 10 bash dev/mutation.sh model "gptlab.lora.*"
#   (cd .mutation/model && mutmut show NAME)          # one mutant's diff
#
# Work happens in .mutation/GROUP/ (git-ignored): a copy of the sources with a generated setup.cfg, so
# mutmut's mutants/ folder never lands in the checkout. Results stay there: a rerun retests what changed.
set -euo pipefail -o noglob  # mutant name patterns hold '*'
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${MUTATION_DIR:-.mutation}

# group -> files mutated, the functions scored (mutmut's names: gptlab.MODULE.x_FUNCTION,
# gptlab.MODULE.xǁCLASSǁMETHOD; a file's other functions are generated but not run), and the tests.
declare -A FILES=(
  [lora]="gptlab/lora.py"
  [statistics]="gptlab/stats.py projects/pretrain_vs_finetune/transfer.py gptlab/selection.py gptlab/report.py projects/pretrain_vs_finetune/analysis.py"
  [model]="gptlab/lora.py gptlab/adapt.py gptlab/optim.py gptlab/steps.py gptlab/finetune.py gptlab/data/supervised.py gptlab/evaluate.py"
)
declare -A FUNCTIONS=(
  [lora]="gptlab.lora.*"
  [statistics]="gptlab.stats.* projects.pretrain_vs_finetune.transfer.* gptlab.selection.* gptlab.report.x_choose* gptlab.report.x_mean_std*
                gptlab.report.x_metric_value* gptlab.report.x_validation_value* projects.pretrain_vs_finetune.analysis.x_pareto*
                projects.pretrain_vs_finetune.analysis.xǁStudyǁgain_share* projects.pretrain_vs_finetune.analysis.xǁStudyǁchoose* projects.pretrain_vs_finetune.analysis.xǁChoiceǁvalues*
                projects.pretrain_vs_finetune.analysis.xǁChoiceǁinterval*"
  [model]="gptlab.lora.* gptlab.adapt.x__selects* gptlab.adapt.x_trainable_mask* gptlab.adapt.x_optimizer*
           gptlab.optim.x_match_mask* gptlab.optim.x_path_str* gptlab.optim.x_param_paths*
           gptlab.steps.x_lm_loss_fn* gptlab.steps.x_metrics_from_sums* gptlab.steps.x_macro_f1*
           gptlab.steps.x_classify_loss_fn* gptlab.data.supervised.x_encode_sft__* gptlab.data.supervised.x_encode_classify__*
           gptlab.evaluate.x_token_stream* gptlab.evaluate.x_windows* gptlab.evaluate.x_lm_metrics*
           gptlab.evaluate.x_sft_metrics* gptlab.evaluate.x_parses_as_python*"
)
declare -A TESTS=(
  [lora]="tests/test_independent_answers.py::test_lora_logits_are_those_of_the_explicit_low_rank_update
          tests/test_independent_answers.py::test_lora_adds_a_gaussian_a_and_a_zero_b_beside_exactly_the_targets
          tests/test_independent_answers.py::test_lora_merge_keeps_the_kernels_dtype_and_reads_scale_from_a_run_config
          tests/test_independent_answers.py::test_lora_targets_must_match_kernels_only
          tests/test_finetune.py::test_lora_starts_equal_and_its_merged_export_reproduces_the_adapted_model"
  [statistics]="tests/test_independent_statistics.py tests/test_transfer.py tests/test_study.py::test_learning_rate_is_chosen_on_validation_not_test
                tests/test_study.py::test_effective_data_of_the_study_recovers_the_known_answer
                tests/test_study.py::test_share_of_full_fine_tunings_gain_is_per_seed
                tests/test_study.py::test_paired_comparisons_and_conclusions_say_what_held tests/test_study.py::test_pareto_front
                tests/test_protocol.py::test_early_stopping_stops_at_the_expected_evaluation
                tests/test_protocol.py::test_report_selects_on_validation_never_on_test"
  [model]="tests/test_independent_answers.py::test_lora_logits_are_those_of_the_explicit_low_rank_update
           tests/test_independent_answers.py::test_lora_adds_a_gaussian_a_and_a_zero_b_beside_exactly_the_targets
           tests/test_independent_answers.py::test_lora_merge_keeps_the_kernels_dtype_and_reads_scale_from_a_run_config
           tests/test_independent_answers.py::test_lora_targets_must_match_kernels_only
           tests/test_independent_answers.py::test_lm_loss_is_the_weighted_sum_of_numpy_cross_entropies
           tests/test_independent_answers.py::test_sft_weights_cover_the_response_and_its_end_of_text_only
           tests/test_independent_answers.py::test_classify_loss_accuracy_and_confusion_on_known_predictions
           tests/test_independent_answers.py::test_accuracy_macro_f1_and_perplexity_from_sums_on_known_predictions
           tests/test_independent_answers.py::test_token_stream_spreads_each_documents_bytes_over_its_tokens
           tests/test_independent_answers.py::test_bits_per_byte_by_hand_on_a_short_text
           tests/test_independent_answers.py::test_exact_match_and_parse_rate_on_crafted_completions
           tests/test_independent_answers.py::test_strategy_masks_by_hand_on_a_two_layer_model
           tests/test_independent_answers.py::test_frozen_parameters_get_no_update_and_trainable_ones_adamws
           tests/test_independent_answers.py::test_match_mask_uses_fullmatch_and_names_a_rule_that_matches_nothing
           tests/test_protocol.py::test_macro_f1_against_hand_computed_values
           tests/test_finetune.py::test_each_strategy_trains_exactly_its_parameters
           tests/test_finetune.py::test_bad_strategy_settings_are_one_line_user_errors
           tests/test_finetune.py::test_sft_loss_weights_cover_exactly_the_response
           tests/test_finetune.py::test_lora_starts_equal_and_its_merged_export_reproduces_the_adapted_model"
)

groups=(statistics model)
if [[ $# -gt 0 ]]; then groups=("$1"); shift; fi
command -v mutmut > /dev/null || { echo 'mutmut is not installed: pip install "mutmut>=3.8"' >&2; exit 2; }
for group in "${groups[@]}"; do
  [[ -n "${FILES[$group]:-}" ]] || { echo "unknown group $group: choose statistics, model or lora" >&2; exit 2; }
  read -ra files <<< "${FILES[$group]}"
  read -ra tests <<< "$(echo ${TESTS[$group]})"
  if [[ $# -gt 0 ]]; then patterns=("$@"); else read -ra patterns <<< "$(echo ${FUNCTIONS[$group]})"; fi
  dir="$WORK/$group"
  mkdir -p "$dir"
  (cd "$dir" && rm -rf gptlab configs experiments tests pytest.ini)
  cp -r gptlab configs experiments tests pytest.ini "$dir/"
  find "$dir" -name __pycache__ -prune -exec rm -rf {} +
  {
    echo "[mutmut]"
    echo "source_paths = gptlab/"
    printf "only_mutate =\n"; printf "    %s\n" "${files[@]}"
    printf "also_copy =\n    configs/\n    experiments/\n    pytest.ini\n"
    printf "pytest_add_cli_args =\n    -p\n    no:xdist\n    -m\n    not slow\n    -q\n"
    printf "pytest_add_cli_args_test_selection =\n"; printf "    %s\n" "${tests[@]}"
    # JAX's runtime threads make forking a process that ran tests unsafe: a fork server imports, then forks.
    echo "process_isolation = forkserver"
  } > "$dir/setup.cfg"
  echo "== $group: mutating ${files[*]}"
  (cd "$dir" && mutmut run --max-children "${MUTATION_JOBS:-2}" "${patterns[@]}" > mutmut.log 2>&1) || {
    tail -c 3000 "$dir/mutmut.log" | tr '\r' '\n' | tail -20; exit 1; }
  # Per module: killed / all run, and the survivors (mutmut show NAME in $dir prints each one's diff).
  (cd "$dir" && mutmut results --all true) | python3 "$ROOT/dev/mutation_summary.py" "${patterns[@]}"
done
