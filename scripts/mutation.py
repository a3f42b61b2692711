"""Mutation testing of one bertode module with mutmut, in a scratch copy (issue 29).

    python scripts/mutation.py bertode/solve/exits.py
    python scripts/mutation.py bertode/layers/losses.py --tests tests/test_sparse_prediction.py
    python scripts/mutation.py bertode/solve/dial.py --jobs 1 --keep
    python scripts/mutation.py bertode/solve/dial.py --again     # after new tests: the survivors only
    python scripts/mutation.py --all --jobs 2                    # every module below in turn (hours), the table

mutmut (the ``mutation`` extra: ``pip install -e .[mutation]``) writes its mutants into a
``mutants/`` folder beside the code it mutates and chdirs there, so this script never runs
it in the working tree: it copies the tree as it is now (``git ls-files`` tracked and
untracked-not-ignored files, uncommitted edits included) into ``/tmp/mut-<module>``,
narrows the copy's ``[mutmut]`` section of setup.cfg to the one module and its tests,
runs ``mutmut run`` there, and reads the results back:

* prints and writes ``results/mutation/<module>.json``: mutants, killed, survived,
  timeout, no tests (a mutated function that no selected test calls), suspicious,
  kill rate = (killed + timeout) / (all mutants - skipped), and each survivor's diff;
* a survivor is a change to the code that the selected tests cannot tell apart: kill it
  with a test against an oracle, or list it as an equivalent mutant with its reason in
  docs/testing.md ("Mutation testing").

``--again`` (after a run with ``--keep``) re-tests only the survivors recorded in the kept
copy, with the working tree's versions of the selected test files copied in afresh (mutmut
collects the new tests' coverage first): the quick loop of writing a test that kills a
survivor. The other mutants keep their recorded results (mutmut forgets those it was not
asked to run). It refuses when the module's source changed since the copy (then run afresh); a
new test elsewhere that needs newer source than the copy's fails mutmut's clean run (the
script then writes nothing: run afresh).

``--processes NAME ...`` (after a run with ``--keep``) runs ``PROCESS_TESTS`` (tests that start
processes: torchrun, the CLI) against the named survivors. mutmut maps a test to the functions
it calls in its own process, so it never runs these against a mutant: here each mutant is
switched on through ``MUTANT_UNDER_TEST`` with the copy's mutated package first on
``PYTHONPATH`` (the tests' processes inherit both), after a clean run without a mutant passes.
A failing run kills the mutant in mutmut's record; the results are then read and written again,
the names killed this way listed under ``killed_by_process_tests``.

Tests default to ``TESTS_BY_MODULE`` below (the files that test that module, chosen to
be quick) and tests/test_mutation_kills.py; ``--tests`` overrides. mutmut runs the
selection once to learn which tests call which function, then runs, for each mutant, only
the tests that reach its function.
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# the sensitivity axis's fast tests (no training run, no subprocess), shared by its modules' selections
SENSITIVITY_TESTS = ["tests/test_sensitivity.py", "tests/test_config.py", "tests/test_kills_sensitivities.py"] + [
    f"tests/test_user_sensitivity.py::test_{name}" for name in (
        "covering_every_step_it_is_autograd", "fewer_steps_truncate_the_gradient",
        "adaptive_solvers_are_refused_in_one_line", "the_former_names_still_work",
        "the_axis_keeps_its_config_field_and_names_its_methods_in_errors")] + [
    f"tests/test_pairings.py::test_{name}" for name in (
        "config_refuses_the_pairing", "the_defaults_of_each_mode_are_filled_from_the_registries",
        "a_saved_config_is_read_leniently_and_a_constructed_one_strictly",
        "options_of_another_mode_are_refused_and_kwargs_are_checked",
        "a_config_whose_mode_changes_fills_the_new_modes_defaults",
        "a_config_is_edited_field_by_field_and_its_pairings_checked_when_a_model_is_built")]
DEQ_SENSITIVITY_TESTS = [f"tests/test_deq.py::test_{name}" for name in (
    "ift_gradient_matches_finite_differences_and_unrolled", "phantom_gradient_is_aligned_with_ift",
    "pretraining_runs_the_layer_unrolled_first", "forward_stats_and_model_residual",
    "nan_in_the_layer_raises_a_named_error")]

# one Euler-1 conversion per family and head kind (test_families.py's node ids): every table row, under a minute
CONVERSIONS = [f"tests/test_families.py::test_euler1_conversion_equals_the_source_in_outputs_and_gradients[{case}]"
               for case in ("bert-ForMaskedLM", "bert-ForSequenceClassification", "roberta-ForMaskedLM",
                            "electra-ForMaskedLM", "electra-ForSequenceClassification", "albert-ForMaskedLM",
                            "distilbert-ForSequenceClassification", "gpt2-LMHeadModel")]

# module -> the test files run against its mutants (the quick ones that test that subject)
TESTS_BY_MODULE = {
    "bertode/solve/exits.py": ["tests/test_depth_dial.py", "tests/test_prelude_coda.py"],
    "bertode/solve/dial.py": ["tests/test_depth_dial.py", "tests/test_depth_curve.py"],
    "bertode/layers/losses.py": ["tests/test_sparse_prediction.py", "tests/test_oracles_training.py"],
    "bertode/layers/dropout.py": ["tests/test_dropout_streams.py", "tests/test_oracles_training.py"],
    "bertode/solve/fixed_point.py": ["tests/test_deq.py", "tests/test_oracles_solve.py"],
    "bertode/solve/substeps.py": ["tests/test_substeps.py"],
    "bertode/training/objective.py": ["tests/test_oracles_training.py", "tests/test_clm.py"],
    "bertode/layers/loop.py": ["tests/test_oracles_solve.py", "tests/test_substeps.py", "tests/test_depth_dial.py"],
    "bertode/solve/ode.py": ["tests/test_oracles_solve.py", "tests/test_sensitivity.py", "tests/test_solvers.py",
                             "tests/test_per_sequence_solve.py", "tests/test_dtype_and_stats.py",
                             "tests/test_oracles_ode.py", "tests/test_kills_ode.py"],
    # _torchdyn: RungeKutta4.step against the classical method written out (node ids; no NeuralODE solve)
    "bertode/solve/_torchdyn.py": [
        "tests/test_kills_ode.py::test_a_step_is_classical_rk4_with_float64_times_and_coefficients",
        "tests/test_kills_ode.py::test_rk4_steps_from_a_given_first_stage",
        "tests/test_oracles_solve.py::test_fixed_step_solvers_on_cos_t_z_match_their_tableau_and_the_closed_form"],
    # the gradient-method axis: its unit tests and refusals (node ids), not the training run nor the CLI's process
    "bertode/solve/ode_sensitivities.py": SENSITIVITY_TESTS + [
        "tests/test_oracles_solve.py::test_adjoint_gradients_of_norm_using_fields_equal_autograd"],
    "bertode/solve/sensitivities.py": SENSITIVITY_TESTS + DEQ_SENSITIVITY_TESTS,
    "bertode/solve/deq_sensitivities.py": DEQ_SENSITIVITY_TESTS + ["tests/test_kills_sensitivities.py"],
    # per_sequence: its own backend's tests (node ids), not torchode's nor the 6 s tsit5 time_weights case
    "bertode/solve/per_sequence.py": [f"tests/test_per_sequence_solve.py::test_{name}" for name in (
        "a_sequence_is_solved_alone_as_in_a_stiff_batch",
        "each_sequence_matches_torchdiffeq_alone[bertode-dopri5-time_residual]",
        "each_sequence_matches_torchdiffeq_alone[bertode-dopri5-add_norm]",
        "rejected_steps_retry_from_where_they_were_against_the_closed_form",
        "gradient_matches_torchdiffeq_and_the_rows_solved_alone",
        "one_host_sync_per_attempted_step_and_the_stats_per_sequence", "the_model_reports_steps_per_sequence",
        "the_step_bound_raises_naming_the_sequence", "refusals_name_the_field")] + ["tests/test_kills_sensitivities.py"],
    "bertode/solve/solvers.py": ["tests/test_solvers.py", "tests/test_oracles_solve.py", "tests/test_user_solver.py"],
    "bertode/layers/vector_fields.py": ["tests/test_equivalence.py", "tests/test_architecture.py",
                                        "tests/test_time_weights.py", "tests/test_oracles_vector_fields.py"],
    # blocks, regularizers: the unit tests (node ids), not the files' training runs (seconds to a minute each)
    "bertode/layers/blocks.py": ["tests/test_blocks.py", "tests/test_macaron.py",
                                 "tests/test_user_block.py::test_both_forms_match_the_equations_with_hf_layers",
                                 "tests/test_user_block.py::test_a_block_with_an_adjoint_is_refused"],
    "bertode/layers/regularizers.py": [
        f"tests/test_regularizers.py::test_{name}" for name in (
            "kinetic_energy_matches_a_dense_quadrature_and_autograd_equals_adjoint",
            "the_hutchinson_jacobian_term_averages_to_the_dense_frobenius_norm",
            "the_penalty_is_in_the_loss_and_its_gradient",
            "the_regularizer_group_composes_and_is_refused_outside_ode_mode",
            "the_augmented_state_carries_the_closed_form_integrands_and_their_gradients",
            "a_user_integrand_of_another_dtype_is_cast_to_the_states",
            "the_rnode_integrands_are_the_kinetic_and_jacobian_ones",
            "registering_a_regulariser_keeps_the_default")],
    # sublayers: HF at Euler-1, causality, and one node id per attention path (relative positions, RoPE under a
    # cache, per-token exit's packed queries, cross-attention's cache, segment memory, recorded attentions)
    "bertode/layers/sublayers.py": [
        "tests/test_equivalence.py", "tests/test_causal.py", "tests/test_kills_attention_stats.py",
        "tests/test_positions.py::test_transformer_xl_scores_and_attention_equal_the_papers_equations",
        "tests/test_positions.py::test_rotary_attention_equals_softmax_of_rotated_queries_and_keys_under_a_cache",
        "tests/test_positions.py::test_per_token_exit_queries_see_their_own_positions",
        "tests/test_positions.py::test_the_cached_decoder_equals_one_forward[rk4-2-steps-transformer_xl]",
        "tests/test_positions.py::test_the_cached_decoder_equals_one_forward[rk4-2-steps-deberta]",
        "tests/test_deberta.py::test_conversion_equals_hf_in_outputs_and_gradients[v2-ForMaskedLM]",
        "tests/test_depth_dial.py::test_a_layer_on_the_active_rows_equals_the_dense_layer_there_and_leaves_the_rest",
        "tests/test_depth_dial.py::test_attentions_under_exit_keep_their_shape_and_exited_rows_are_zero",
        "tests/test_cross_attention.py::test_the_cache_reads_the_encoder_once_and_generation_equals_no_cache",
        "tests/test_cross_attention.py::test_cross_attention_converts_exactly_from_hf_bert_decoders",
        "tests/test_segment_memory.py::test_reading_by_segments_equals_the_whole_text_where_attention_is_evaluated_"
        "once_per_layer",
        "tests/test_inspect.py::test_attentions_equal_hf_eager_attentions_at_euler1"],
    # stats, observe, host_syncs: their unit tests and the models' counts, attentions and trajectories (no training)
    "bertode/solve/stats.py": [
        "tests/test_kills_attention_stats.py", "tests/test_dtype_and_stats.py::test_fixed_step_counts",
        "tests/test_dtype_and_stats.py::test_adaptive_counts_and_backward_nfe_are_reset_per_batch",
        "tests/test_per_sequence_solve.py::test_one_host_sync_per_attempted_step_and_the_stats_per_sequence",
        "tests/test_per_sequence_solve.py::test_the_model_reports_steps_per_sequence",
        "tests/test_deq.py::test_forward_stats_and_model_residual"],
    "bertode/solve/observe.py": [
        "tests/test_kills_attention_stats.py",
        "tests/test_inspect.py::test_attentions_equal_hf_eager_attentions_at_euler1",
        "tests/test_inspect.py::test_all_attentions_stack_every_evaluation_and_a_deq_gives_its_last",
        "tests/test_inspect.py::test_trajectories_have_monotone_times_and_end_at_the_layer_output",
        "tests/test_inspect.py::test_a_deq_trajectory_is_its_iterates",
        "tests/test_inspect.py::test_gradient_checkpointing_with_attentions_requested"],
    "bertode/solve/host_syncs.py": ["tests/test_kills_attention_stats.py", "tests/test_host_syncs.py"],
    # embeddings: each variant against its HF source (node ids): RoBERTa's numbering, ELECTRA/ALBERT's projection,
    # DistilBERT/GPT-2 without token types or LayerNorm, DeBERTa's projection before the norm, cached positions,
    # inputs_embeds, the sparse and adaptive heads; not the files' training runs
    "bertode/layers/embeddings.py": ["tests/test_equivalence.py", *CONVERSIONS, "tests/test_kills_conversion.py",
        "tests/test_deberta.py::test_conversion_equals_hf_in_outputs_and_gradients",
        "tests/test_kv_cache.py::test_cached_logits_equal_hf_bert_decoders_with_their_own_cache",
        "tests/test_causal_lm_conventions.py::test_generate_from_inputs_embeds_equals_hf_and_generating_from_the_ids",
        "tests/test_sparse_prediction.py::test_masked_lm_sparse_equals_dense",
        "tests/test_adaptive_head.py::test_loss_equals_torchs_adaptive_softmax_on_the_same_weights"],
    # convert: the conversions and refusals (node ids), directories, the prelude/coda split, DeBERTa's adapted state
    "bertode/convert.py": [*CONVERSIONS, "tests/test_kills_conversion.py",
        "tests/test_families.py::test_from_pretrained_on_a_family_directory_converts[bert]",
        "tests/test_families.py::test_other_model_types_and_architectures_are_refused_in_one_line",
        "tests/test_families.py::test_untied_output_embeddings_convert_exactly",
        "tests/test_prelude_coda.py::test_from_bert_maps_the_stack_onto_prelude_core_and_coda",
        "tests/test_prelude_coda.py::test_from_bert_splits_albert_s_one_shared_layer_applied_again",
        "tests/test_prelude_coda.py::test_from_bert_gives_a_tied_core_the_first_or_the_mean_middle_layer",
        "tests/test_prelude_coda.py::test_a_split_leaving_no_core_is_refused",
        "tests/test_deberta.py::test_conversion_equals_hf_in_outputs_and_gradients"],
    # families: every family's conversion and its one-line refusals (node ids)
    "bertode/families.py": [*CONVERSIONS, "tests/test_kills_conversion.py",
        "tests/test_families.py::test_other_model_types_and_architectures_are_refused_in_one_line",
        "tests/test_families.py::test_untied_output_embeddings_convert_exactly",
        "tests/test_deberta.py::test_conversion_equals_hf_in_outputs_and_gradients",
        "tests/test_deberta.py::test_unsupported_deberta_features_are_refused_in_one_line",
        "tests/test_gpt2.py::test_gpt2_variants_bertode_cannot_express_are_refused_in_one_line",
        "tests/test_gpt2.py::test_a_gpt2_head_without_a_bertode_class_and_gpt2_as_a_deq_are_refused"],
    # loop: short in-process runs checked against a hand-written step (test_train's runs take minutes per mutant)
    "bertode/training/loop.py": ["tests/test_kills_training.py"],
    # lm: the unit tests of evaluate (node ids); the files' training runs reach evaluate too, minutes per mutant
    "bertode/training/lm.py": [
        "tests/test_oracles_training.py::test_evaluate_is_the_total_cross_entropy_over_the_total_targets",
        "tests/test_segment_memory_training.py::test_the_ordered_evaluation_is_the_loss_of_each_slice_read_as_one_text",
        "tests/test_clm.py::test_clm_targets_are_the_text_tokens_of_each_row_and_the_loss_is_their_mean_cross_entropy"],
    # evaluate: its in-process tests (node ids; test_train's and test_depth_curve's runs take 10-60 s per mutant)
    "bertode/training/evaluate.py": [f"tests/test_kills_training.py::test_{name}" for name in (
        "evaluate_is_the_total_cross_entropy_over_the_total_targets_of_batches_of_unequal_counts",
        "an_evaluation_with_another_solve_says_so",
        "the_curve_of_a_looped_core_is_the_loss_of_separate_evaluations_at_each_depth",
        "the_depth_curve_repeats_a_converged_solves_last_iterate_and_reduces_as_the_loss",
        "the_depth_curve_goes_to_the_dialled_depth_and_caps_the_perplexity",
        "the_configured_depth_is_a_deqs_iterations_or_the_cores_applications",
        "curve_needs_an_iterated_depth_in_one_line", "the_rows_must_fit_the_checkpoints_positions",
        "the_objective_is_the_checkpoints_or_one_with_its_attention",
        "a_checkpoint_folder_is_read_or_refused_in_one_line", "evaluate_refuses_a_split_it_cannot_read_in_one_line",
        "evaluate_refuses_a_tokenizer_without_cls_or_sep_in_one_line", "evaluate_scores_a_causal_lm_by_its_next_tokens")]
    + ["tests/test_kills_evaluate.py"],  # its refusals word for word, plugins, model.mem_len, a DEQ's, a word vocabulary's
    # deq: the DEQ's unit tests and its dial, exit, cache, memory and trajectory paths (node ids), not its training runs
    "bertode/layers/deq.py": [f"tests/test_deq.py::test_{name}" for name in (
        "solvers_reach_tolerance_and_agree", "qkv_injection_enters_attention_only", "anderson_matches_torchdeq",
        "forward_stats_and_model_residual", "ift_gradient_matches_finite_differences_and_unrolled",
        "phantom_gradient_is_aligned_with_ift", "bf16_autocast_forward_converges_like_fp32",
        "nan_in_the_layer_raises_a_named_error", "nan_batch_is_skipped_and_counted_when_configured",
        "non_converging_solve_is_counted_and_training_continues",
        "hutchinson_penalty_estimates_the_jacobian_frobenius_norm",
        "jacobian_penalty_is_added_to_the_loss", "jacobian_weight_grows_by_a_tenth_every_increment_period",
        "pretraining_runs_the_layer_unrolled_first", "weight_norm_keeps_the_function_and_round_trips",
        "spectral_radius_is_reported_at_eval", "broyden_restarts_instead_of_overflowing")] + [
        "tests/test_depth_dial.py::test_the_dialled_depth_is_what_each_encoder_iterates",
        "tests/test_depth_dial.py::test_an_exited_token_keeps_its_state_and_the_others_go_on[deq]",
        "tests/test_depth_dial.py::test_an_exited_token_keeps_its_state_and_the_others_go_on[deq_qkv]",
        "tests/test_depth_dial.py::test_exit_while_training_is_refused_in_one_line",
        "tests/test_depth_dial.py::test_threshold_zero_gives_outputs_identical_to_no_exit[kl-deq]",
        "tests/test_depth_dial.py::test_phantom_takes_the_dialled_k_as_its_steps",
        "tests/test_inspect.py::test_a_deq_trajectory_is_its_iterates",
        "tests/test_kv_cache.py::test_the_deq_cache_is_exact_to_the_solves_tolerance",
        "tests/test_segment_memory.py::test_reading_by_segments_equals_the_whole_text_where_attention_is_evaluated_"
        "once_per_layer[deq_qkv-transformer_xl]",
        "tests/test_kills_deq_site.py"],
    # site: HF at Euler-1, a pre-LN layer written out, Macaron's spans, the adjoint of norm-using fields, the active
    # rows of per-token exit, a DEQ's reused dropout masks and the regularisers' augmented state (node ids)
    "bertode/layers/site.py": ["tests/test_equivalence.py",
        "tests/test_pre_ln.py::test_discrete_and_euler_1_equal_a_hand_written_pre_ln_transformer",
        "tests/test_pre_ln.py::test_euler_1_has_the_discrete_gradients_and_the_adjoint_differentiates_the_branch_norm",
        "tests/test_macaron.py::test_block_strang_is_the_macaron_layer",
        "tests/test_macaron.py::test_in_ode_mode_the_halves_solve_over_their_half_of_the_layers_interval",
        "tests/test_oracles_solve.py::test_adjoint_gradients_of_norm_using_fields_equal_autograd",
        "tests/test_depth_dial.py::test_a_layer_on_the_active_rows_equals_the_dense_layer_there_and_leaves_the_rest",
        "tests/test_regularizers.py::test_the_penalty_is_in_the_loss_and_its_gradient",
        "tests/test_inspect.py::test_trajectories_have_monotone_times_and_end_at_the_layer_output",
        "tests/test_inspect.py::test_attentions_equal_hf_eager_attentions_at_euler1",
        "tests/test_deberta.py::test_an_adjoint_differentiates_the_shared_table",
        "tests/test_segment_memory.py::test_reading_by_segments_equals_the_whole_text_where_attention_is_evaluated_"
        "once_per_layer[discrete-transformer_xl]",
        "tests/test_segment_memory.py::test_reading_by_segments_equals_the_whole_text_where_attention_is_evaluated_"
        "once_per_layer[deq_qkv-transformer_xl]",
        "tests/test_regularizers.py::test_the_hutchinson_jacobian_term_averages_to_the_dense_frobenius_norm",
        "tests/test_depth_dial.py::test_truncated_ode_gradient_equals_the_hand_written_truncated_euler_recursion",
        "tests/test_kills_deq_site.py"],
    # checkpoint: its in-process unit tests (the files' training runs take seconds to minutes per mutant)
    "bertode/training/checkpoint.py": ["tests/test_kills_training.py", "tests/test_legacy.py"],
    # segments: its unit tests only (node ids: a -k here would replace setup.cfg's); the file's training runs
    # (resume, evaluation at another mem_len) take minutes per mutant
    "bertode/training/segments.py": [
        f"tests/test_segment_memory_training.py::test_{name}" for name in (
            "each_batch_row_reads_the_next_row_of_its_own_slice_at_any_world_size",
            "a_checkpointed_memory_is_every_global_row_in_order_and_each_rank_takes_its_own",
            "the_ordered_evaluation_is_the_loss_of_each_slice_read_as_one_text",
            "memory_settings_a_run_cannot_use_are_refused_before_anything_is_written")],
    "bertode/training/schedule.py": ["tests/test_schedule.py"],
    "bertode/training/words.py": ["tests/test_word_vocabulary.py"],
    "bertode/training/distributed.py": ["tests/test_data_order.py"],
    # stream: test_data's stream unit tests, validate's layout refusal (node ids) and rows packed by hand in
    # test_kills_stream; not the streamed training runs nor torchrun (seconds to minutes per mutant)
    "bertode/training/stream.py": [
        "tests/test_data.py::test_stream_ranks_read_disjoint_shards_and_together_give_the_one_process_rows",
        "tests/test_data.py::test_a_shard_too_small_for_one_row_is_a_data_error_and_a_resume_at_a_documents_tail_is_not",
        "tests/test_kills_training.py::test_validate_refuses_each_setting_in_its_own_line", "tests/test_kills_stream.py"],
    "bertode/training/wordpiece.py": [  # not test_tokenizer's two fresh processes (subprocesses, seconds each)
        "tests/test_oracles_training.py::test_wordpiece_merges_in_the_documented_order_with_ties_broken_by_the_pair",
        "tests/test_oracles_training.py::test_the_default_run_trains_the_pinned_vocabulary_on_the_shipped_sample",
        "tests/test_tokenizer.py::test_the_vocabulary_matches_the_tokenizers_trainer_up_to_ties"],
    "bertode/layers/segment_memory.py": ["tests/test_segment_memory.py"],  # tiny models, no training run: 8 s
    # disentangled: HF DeBERTa as the oracle and the scheme's unit tests (node ids); not the ODE training run
    "bertode/layers/disentangled.py": [
        "tests/test_deberta.py::test_conversion_equals_hf_in_outputs_and_gradients",
        "tests/test_deberta.py::test_log_buckets_equal_transformers",
        "tests/test_deberta.py::test_deberta_fields_are_checked_in_one_line",
        "tests/test_deberta.py::test_an_adjoint_differentiates_the_shared_table",
        "tests/test_positions.py::test_scores_depend_on_i_minus_j_only",
        "tests/test_positions.py::test_per_token_exit_queries_see_their_own_positions",
        "tests/test_positions.py::test_the_cached_decoder_equals_one_forward"],
    # positions: the schemes' oracles (the paper's equations, Llama's RoPE, the cached decoder without a DEQ)
    "bertode/layers/positions.py": [f"tests/test_positions.py::test_{name}" for name in (
        "transformer_xl_scores_and_attention_equal_the_papers_equations", "rotary_equals_a_pairwise_rotation_and_llamas",
        "rotary_attention_equals_softmax_of_rotated_queries_and_keys_under_a_cache", "scores_depend_on_i_minus_j_only",
        "rotary_scores_do_not_change_when_the_absolute_start_shifts", "per_token_exit_queries_see_their_own_positions",
        "the_cached_decoder_equals_one_forward[discrete-rotary]",
        "the_cached_decoder_equals_one_forward[discrete-transformer_xl]",
        "the_cached_decoder_equals_one_forward[rk4-2-steps-rotary]",
        "the_cached_decoder_equals_one_forward[rk4-2-steps-transformer_xl]",
        "from_bert_refuses_to_drop_the_sources_absolute_positions",
        "unknown_schemes_and_a_stray_rope_theta_are_one_line")] + ["tests/test_kills_positions_cache.py"],
    # kv_cache: one forward against cached decoding per mode (one DEQ: its prelude, qkv map and coda), HF's cached
    # BERT decoder, cross-attention's cache, the refusals; not the other DEQ cases (4-9 s each) nor generate's process
    "bertode/layers/kv_cache.py": [f"tests/test_kv_cache.py::test_{name}" for name in (
        *(f"a_sequence_fed_through_the_cache_has_the_logits_of_one_forward[{mode}]" for mode in (
            "discrete", "euler-1", "rk4-2-steps", "midpoint-time_weights", "rk2-block", "rk2_gated-ode-block",
            "weight-tied-injected", "deq-qkv-prelude-coda")),
        "the_cache_holds_one_slot_per_attention_evaluation",
        "greedy_and_beam_search_give_the_same_tokens_with_and_without_the_cache[discrete]",
        "greedy_and_beam_search_give_the_same_tokens_with_and_without_the_cache[weight-tied-injected]",
        "cached_logits_equal_hf_bert_decoders_with_their_own_cache", "positions_after_padding_continue_after_the_cache",
        "adaptive_solvers_generate_without_a_cache_and_refuse_one_in_one_line",
        "calls_that_disagree_with_the_cache_are_refused_in_one_line", "per_token_exit_refuses_a_cache",
        "fixed_length_caches_are_refused_in_one_line")] + [
        "tests/test_cross_attention.py::test_the_cache_reads_the_encoder_once_and_generation_equals_no_cache",
        "tests/test_causal_lm_conventions.py::test_generate_returns_every_steps_attentions_and_hidden_states_as_hf",
        "tests/test_kills_positions_cache.py"],
    "bertode/layers/adaptive.py": ["tests/test_adaptive_head.py", "tests/test_kills_positions_cache.py"],
    # encoder: HF at Euler-1, the depth dial and looped core, prelude/coda, checkpointing and attentions, Macaron, the
    # blocks' records, cross-attention, the caching and checkpointing refusals (node ids; no training run)
    "bertode/layers/encoder.py": [
        "tests/test_equivalence.py", "tests/test_depth_dial.py", "tests/test_prelude_coda.py", "tests/test_inspect.py",
        "tests/test_macaron.py", "tests/test_blocks.py", "tests/test_kills_encoder.py",
        "tests/test_regularizers.py::test_the_penalty_is_in_the_loss_and_its_gradient",
        "tests/test_dtype_and_stats.py::test_fixed_step_counts",
        "tests/test_dtype_and_stats.py::test_weight_tying_reuses_one_layer",
        "tests/test_cross_attention.py::test_cross_attention_converts_exactly_from_hf_bert_decoders",
        "tests/test_cross_attention.py::test_the_cache_reads_the_encoder_once_and_generation_equals_no_cache",
        "tests/test_kv_cache.py::test_adaptive_solvers_generate_without_a_cache_and_refuse_one_in_one_line",
        "tests/test_kv_cache.py::test_per_token_exit_refuses_a_cache",
        "tests/test_kv_cache.py::test_a_sequence_fed_through_the_cache_has_the_logits_of_one_forward"
        "[weight-tied-injected]",
        "tests/test_kills_deq_site.py::test_caching_refusals_name_the_exit_first_then_training_with_gradients",
        "tests/test_kills_deq_site.py::test_checkpointing_a_deq_is_refused_in_one_line",
        "tests/test_kills_positions_cache.py"],
    # prelude_coda: the split stack against the unsplit one and HF, its looped/DEQ cores, dial, exit, checkpointing,
    # saving, and its DEQ core's cache (node ids; no training run)
    "bertode/layers/prelude_coda.py": [
        "tests/test_prelude_coda.py", "tests/test_depth_dial.py", "tests/test_kills_encoder.py",
        "tests/test_kills_prelude_coda.py",
        "tests/test_kv_cache.py::test_a_sequence_fed_through_the_cache_has_the_logits_of_one_forward"
        "[deq-qkv-prelude-coda]",
        "tests/test_kills_conversion.py::test_a_prelude_without_a_coda_splits_the_stack_and_equals_the_source",
        "tests/test_kills_conversion.py::test_from_pretrained_on_a_bert_directory_passes_conversion_fields_to_from_"
        "bert_and_the_rest_to_the_source"],
}

# the oracle tests written to kill earlier survivors, run against every module's mutants
KILLS = "tests/test_mutation_kills.py"

# module -> tests that start processes, for ``--processes`` (one at a time: each torchrun uses a fixed port)
PROCESS_TESTS = {
    "bertode/training/loop.py": [  # two ranks against one process: DDP, its no_sync, rank slicing, rank 0's files
        "tests/test_oracles_training.py::test_torchrun_with_grad_accumulation_and_rnode_matches_one_process",
        "tests/test_segment_memory_training.py::test_two_processes_read_the_same_text_and_save_the_same_memory_as_one"],
}

# module -> function headers left unmutated in the copy (``# pragma: no mutate block``), with the reason:
# mutmut's trampoline hides a signature from ``inspect.getfullargspec``, and torchdyn reads the field's
# (whether forward takes t) to decide how to call it, so with a trampoline every solve through NeuralODE fails
UNMUTATED = {
    "bertode/solve/ode.py": ["    def forward(self, t, x, args=None):"],  # FieldAdapter.forward
    # host_syncs walks the stack from these (a sync's site, torch.optim's own reads): a trampoline frame there, in
    # mutmut's file, would be taken for the caller, so every site and optimizer test fails under any mutant
    "bertode/solve/host_syncs.py": [
        "    def add(self, op: str) -> None:", "def _caller_site() -> str:", "def _read_by_optimizer() -> bool:",
        "def _host_state_read(name: str, args) -> bool:",
        "    def __torch_dispatch__(self, func, types, args=(), kwargs=None):"],
}

STATUS_BY_EXIT_CODE = {  # mutmut 3's codes (mutmut/stats.py), kept here so the counts need no mutmut import
    1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
    36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
    -11: "segfault", -9: "segfault", None: "not checked",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", nargs="?", help="a .py file of bertode, relative to the repository root")
    parser.add_argument("--all", action="store_true",
                        help="every module of TESTS_BY_MODULE in turn (hours), then the kill-rate table")
    parser.add_argument("--tests", nargs="+", help="test files or node ids (default: TESTS_BY_MODULE[module])")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (mutmut --max-children)")
    parser.add_argument("--scratch", type=Path, help="scratch copy (default /tmp/mut-<module>)")
    parser.add_argument("--out", type=Path, help="results JSON (default results/mutation/<module>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (for --again, `mutmut show/browse`)")
    parser.add_argument("--again", action="store_true", help="re-test the kept copy's survivors with today's tests/")
    parser.add_argument("--processes", nargs="+", metavar="NAME",
                        help="run PROCESS_TESTS[module] against these survivors of the kept copy (mutant names)")
    args = parser.parse_args(argv)
    if args.all:
        given = [f"--{name}" for name in ("tests", "scratch", "out", "processes") if getattr(args, name)]
        given += ["module"] * bool(args.module) + ["--again"] * args.again
        if given:
            parser.error(f"--all with {', '.join(given)} is invalid; allowed with --all: --jobs, --keep")
        return args
    if args.module is None:
        parser.error("module is missing; allowed: a file bertode/**/*.py of this repository, or --all")
    module = Path(args.module).as_posix()
    if not module.startswith("bertode/") or not module.endswith(".py") or not (REPO / module).is_file():
        parser.error(f"module={args.module!r} is invalid; allowed: a file bertode/**/*.py of this repository")
    args.module = module
    if args.processes and (args.again or args.tests):
        parser.error("--processes with --again or --tests is invalid; allowed: --processes alone (with --scratch, --out)")
    if args.processes and module not in PROCESS_TESTS:
        parser.error(f"--processes is invalid for module={module!r}: it has no PROCESS_TESTS; allowed: "
                     f"{', '.join(sorted(PROCESS_TESTS))}")
    if args.tests is None:
        if module not in TESTS_BY_MODULE:
            parser.error(f"module={module!r} has no default tests; pass --tests (known: {sorted(TESTS_BY_MODULE)})")
        args.tests = TESTS_BY_MODULE[module] + [KILLS]
    slug = module[len("bertode/"):-len(".py")].replace("/", ".")
    args.scratch = args.scratch or Path(f"/tmp/mut-{slug}")
    args.out = args.out or REPO / "results" / "mutation" / f"{slug}.json"
    return args


def copy_tree(scratch: Path) -> None:
    """The working tree as it is (tracked and untracked-not-ignored files) into ``scratch``."""
    if scratch.exists():
        shutil.rmtree(scratch)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, scratch / name)
    # tests that read ../shared/data beside the repository find it beside mutmut's mutants/ (where they run)
    if (REPO.parent / "shared").is_dir():
        (scratch / "shared").symlink_to(REPO.parent / "shared")


def marked_source(module: str) -> bytes:
    """The module's source as the copy holds it: ``UNMUTATED`` function headers marked not to mutate."""
    source = (REPO / module).read_text()
    for header in UNMUTATED.get(module, []):
        if source.count(header + "\n") != 1:
            raise SystemExit(f"UNMUTATED[{module!r}]: {header.strip()!r} is not one line of {module}; update the script")
        source = source.replace(header + "\n", header + "  # pragma: no mutate block\n")
    return source.encode()


def refresh_tests(scratch: Path, module: str, tests: list[str]) -> list[str]:
    """For ``--again``: the working tree's versions of the selected test files (and conftest.py) into
    the kept copy; the names of its survivors."""
    meta = scratch / "mutants" / f"{module}.meta"
    if not meta.exists():
        raise SystemExit(f"--again needs a kept copy with results: {meta} is missing (run once with --keep)")
    if (scratch / module).read_bytes() != marked_source(module):
        raise SystemExit(f"{module} changed since the copy in {scratch} was made; run without --again")
    for name in {"tests/conftest.py", *(test.split("::")[0] for test in tests if not test.startswith("-"))}:
        shutil.copy2(REPO / name, scratch / name)
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return sorted(name for name, code in codes.items()
                  if STATUS_BY_EXIT_CODE.get(code, "suspicious") in ("survived", "no tests", "suspicious"))


def kept_codes(scratch: Path, module: str, previous: dict) -> None:
    """After a re-run of some mutants: the others' exit codes as recorded before it (mutmut 3 sets
    every mutant it was not asked to run to "not checked")."""
    meta_path = scratch / "mutants" / f"{module}.meta"
    meta = json.loads(meta_path.read_text())
    for name, code in previous.items():
        if meta["exit_code_by_key"].get(name) is None:
            meta["exit_code_by_key"][name] = code
    meta_path.write_text(json.dumps(meta))


def kill_by_processes(args: argparse.Namespace) -> list[str]:
    """``--processes``: the named survivors run against ``PROCESS_TESTS[module]`` in the kept copy; those
    a failing run kills are written into mutmut's record. Returns their names."""
    meta_path = args.scratch / "mutants" / f"{args.module}.meta"
    survivors = refresh_tests(args.scratch, args.module, [])
    prefix = args.module[:-len(".py")].replace("/", ".") + "."
    names = [name if name.startswith(prefix) else prefix + name for name in args.processes]
    for name in names:
        if name not in survivors:
            raise SystemExit(f"--processes {name!r} is invalid: not a survivor of {meta_path}; allowed: "
                             f"{len(survivors)} survivors (e.g. {survivors[0] if survivors else 'none'})")
    tests = PROCESS_TESTS[args.module]
    for name in {test.split("::")[0] for test in tests}:
        shutil.copy2(REPO / name, args.scratch / "mutants" / name)
    mutants = args.scratch / "mutants"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(mutants), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *tests]
    print(f"{' '.join(command)}  (in {mutants}), without a mutant first", flush=True)
    if subprocess.run(command, cwd=mutants, env=dict(env, MUTANT_UNDER_TEST="")).returncode:
        raise SystemExit("the process tests fail without a mutant; nothing can be concluded")
    meta = json.loads(meta_path.read_text())
    killed = []
    for name in names:
        done = subprocess.run(command, cwd=mutants, env=dict(env, MUTANT_UNDER_TEST=name), capture_output=True,
                              text=True)
        if done.returncode == 1:  # a test failed (not: usage error, nothing collected)
            meta["exit_code_by_key"][name] = 1
            killed.append(name)
        print(f"{name}: {'killed' if done.returncode == 1 else f'survived (pytest exit {done.returncode})'}", flush=True)
        meta_path.write_text(json.dumps(meta))
    return killed


def narrow_config(scratch: Path, module: str, tests: list[str]) -> None:
    """The copy's [mutmut] section: mutate ``module`` only, select ``tests``."""
    config = configparser.RawConfigParser()
    config.read(scratch / "setup.cfg")
    config.set("mutmut", "only_mutate", module)
    config.set("mutmut", "pytest_add_cli_args_test_selection", "\n" + "\n".join(tests))
    with open(scratch / "setup.cfg", "w") as handle:
        config.write(handle)


def read_results(scratch: Path, module: str) -> dict:
    meta = json.loads((scratch / "mutants" / f"{module}.meta").read_text())
    status_by_mutant = {name: STATUS_BY_EXIT_CODE.get(code, "suspicious")
                        for name, code in meta["exit_code_by_key"].items()}
    counts = {status: 0 for status in ("killed", "survived", "timeout", "no tests", "suspicious", "skipped", "segfault",
                                       "not checked")}
    for status in status_by_mutant.values():
        counts[status] = counts.get(status, 0) + 1
    tested = len(status_by_mutant) - counts["skipped"] - counts["not checked"]
    not_killed = sorted(name for name, status in status_by_mutant.items()
                        if status in ("survived", "no tests", "suspicious"))
    survivors = []
    for name in not_killed:
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=scratch, capture_output=True,
                              text=True)
        survivors.append(dict(name=name, status=status_by_mutant[name], diff=diff.stdout.split("\n", 1)[-1].strip()))
    return dict(
        mutants=len(status_by_mutant), **{key.replace(" ", "_"): value for key, value in counts.items()},
        kill_rate=round((counts["killed"] + counts["timeout"]) / tested, 4) if tested else None,
        survivors=survivors,
    )


def table() -> str:
    """The kill rates recorded in results/mutation/ (docs/testing.md's table adds the equivalent mutants)."""
    lines = ["| module | mutants | killed | survivors | kill rate |", "| --- | ---: | ---: | ---: | ---: |"]
    for path in sorted((REPO / "results" / "mutation").glob("*.json")):
        record = json.loads(path.read_text())
        killed = record["killed"] + record["timeout"]
        lines.append(f"| {record['module']} | {record['mutants']} | {killed} | {record['mutants'] - killed} | "
                     f"{killed / record['mutants']:.1%} |")
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> int:
    """Each module of TESTS_BY_MODULE with its default tests, one after another; the table at the end."""
    options = ["--jobs", str(args.jobs)] + ["--keep"] * args.keep
    failed = [module for module in TESTS_BY_MODULE if main([module, *options])]
    print("\n" + table())
    if failed:
        print(f"mutmut wrote no results for {len(failed)} modules: {', '.join(failed)}", file=sys.stderr)
    return int(bool(failed))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.all:
        return run_all(args)
    if args.processes:
        started = datetime.datetime.now(datetime.timezone.utc)
        killed = kill_by_processes(args)
        recorded = json.loads(args.out.read_text()) if args.out.exists() else {}
        results = dict(recorded, **read_results(args.scratch, args.module), process_tests=PROCESS_TESTS[args.module],
                       killed_by_process_tests=sorted({*recorded.get("killed_by_process_tests", []), *killed}))
        results["minutes"] = round(recorded.get("minutes", 0) + (datetime.datetime.now(datetime.timezone.utc)
                                                                 - started).total_seconds() / 60, 1)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{len(killed)} of {len(args.processes)} killed by the process tests -> {args.out}")
        return 0
    names, previous = [], {}
    if args.again:
        names = refresh_tests(args.scratch, args.module, args.tests)
        previous = json.loads((args.scratch / "mutants" / f"{args.module}.meta").read_text())["exit_code_by_key"]
        print(f"re-testing {len(names)} survivors in {args.scratch}", flush=True)
    else:
        print(f"copying the working tree into {args.scratch}", flush=True)
        copy_tree(args.scratch)
        (args.scratch / args.module).write_bytes(marked_source(args.module))
    narrow_config(args.scratch, args.module, args.tests)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    started = datetime.datetime.now(datetime.timezone.utc)
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *names]
    print(f"{' '.join(command)}  (in {args.scratch}; tests: {' '.join(args.tests)})", flush=True)
    run = subprocess.run(command, cwd=args.scratch, env=env)
    meta = args.scratch / "mutants" / f"{args.module}.meta"
    if run.returncode or not meta.exists():
        print(f"mutmut wrote no results for {args.module} (exit code {run.returncode})", file=sys.stderr)
        return 1
    if previous:
        kept_codes(args.scratch, args.module, previous)
    results = dict(
        module=args.module, tool=f"mutmut {version('mutmut')}", date=started.strftime("%Y-%m-%d"),
        minutes=round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60, 1),
        tests=args.tests, retested_survivors=len(names) if args.again else None,
        **read_results(args.scratch, args.module),
    )
    if args.again and args.out.exists():  # a kill by the process tests stays in mutmut's record, and its name here
        recorded = json.loads(args.out.read_text())
        results.update({key: recorded[key] for key in ("process_tests", "killed_by_process_tests") if key in recorded})
    if results["not_checked"]:
        print(f"mutmut left {results['not_checked']} of {results['mutants']} mutants unchecked (exit code "
              f"{run.returncode}; its output above says why); no results written", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for survivor in results["survivors"]:
        print(f"\n# {survivor['name']}: {survivor['status']}\n{survivor['diff']}")
    keys = ("mutants", "killed", "survived", "timeout", "no_tests", "suspicious")
    counts = ", ".join(f"{key} {results[key]}" for key in keys)
    rate = "n/a" if results["kill_rate"] is None else f"{results['kill_rate']:.1%}"
    print(f"\n{args.module}: {counts}; kill rate {rate} ({results['minutes']} min) -> {args.out}")
    if not (args.keep or args.again):
        shutil.rmtree(args.scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
