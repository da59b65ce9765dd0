"""Every test's group, so the kinds of test can be run and told apart (`pytest -m unit`, `make test-unit`, ...):

- `unit`: functions, math and config checks on their own; no stage runs (seconds in all);
- `stage`: one stage runs (training, sampling, curation, a CLI run, two processes);
- `recipe`: stages chained by a recipe, end to end (or a whole recipe validated).

A file's group, then the tests of that file that belong to another group (by function name). conftest.py marks
each test with its group; `tests/test_tooling.py` checks that every test file is listed and every test has
exactly one group.
"""

GROUPS = ("unit", "stage", "recipe")

FILES = {
    "test_balance.py": "unit",
    "test_bench.py": "unit",
    "test_bundle.py": "unit",
    "test_cli.py": "unit",
    "test_config_errors.py": "unit",
    "test_curation.py": "unit",
    "test_curation_models.py": "unit",
    "test_ddpo.py": "unit",
    "test_distributed.py": "stage",
    "test_dpo.py": "unit",
    "test_evaluate_compare.py": "stage",
    "test_faults.py": "stage",
    "test_flow_grpo_math.py": "unit",
    "test_gpu_check.py": "unit",
    "test_grpo.py": "unit",
    "test_guard_ema.py": "unit",
    "test_image_to_video.py": "unit",
    "test_import_graph.py": "unit",
    "test_latent_cache.py": "stage",
    "test_lora_formats.py": "unit",
    "test_lora_memory.py": "unit",
    "test_nft_math.py": "unit",
    "test_noise.py": "unit",
    "test_optimizer_step.py": "unit",
    "test_oracle.py": "unit",
    "test_outputs.py": "unit",
    "test_preferences.py": "unit",
    "test_pretrain.py": "stage",
    "test_private_apis.py": "unit",
    "test_quality.py": "unit",
    "test_real_models.py": "unit",
    "test_recipe.py": "recipe",
    "test_resume_changes.py": "stage",
    "test_reward_model.py": "unit",
    "test_rewards_clip.py": "unit",
    "test_rewards_synthetic.py": "unit",
    "test_rewards_video.py": "unit",
    "test_run_dir.py": "stage",
    "test_rwr.py": "unit",
    "test_safe_loading.py": "unit",
    "test_sft.py": "unit",
    "test_shards.py": "unit",
    "test_stage_config.py": "unit",
    "test_summary.py": "unit",
    "test_sweep.py": "unit",
    "test_synthetic.py": "unit",
    "test_tooling.py": "unit",
    "test_vader.py": "unit",
    "test_vader_i2v.py": "unit",
}

EXCEPTIONS = {
    "test_bench.py": {"stage": ["test_bench_prints_both_loops_and_their_ratio"]},
    "test_cli.py": {"stage": ["test_multirun_runs_one_job_per_combination_in_its_own_directory"]},
    "test_config_errors.py": {"recipe": ["test_a_recipe_validates_every_stage_before_its_first_stage_runs",
                                         "test_the_whole_tiny_recipe_validates_before_any_stage_ran"]},
    "test_curation.py": {"stage": ["test_curation_catches_what_was_planted", "test_curated_shards_train",
                                   "test_one_worker_writes_what_two_write_and_reruns_skip_finished_work",
                                   "test_approximate_dedup_catches_what_flat_catches",
                                   "test_safety_filter_drops_and_counts", "test_shard_input_and_model_steps"]},
    "test_ddpo.py": {"stage": ["test_ddpo_trains_logs_queries_and_exports", "test_interrupted_and_resumed_ddpo_ends_identical",
                               "test_ddpo_gathers_rewards_and_statistics_across_two_processes"]},
    "test_dpo.py": {"stage": ["test_dpo_learns_the_preferred_colour_and_exports",
                              "test_interrupted_and_resumed_dpo_ends_with_the_same_weights",
                              "test_dpo_on_a_flow_matching_model", "test_dpo_reward_curve_starts_where_the_pairs_left_off"]},
    "test_evaluate_compare.py": {"unit": ["test_compare_spends_the_same_reward_queries_on_each_method",
                                          "test_compare_report_has_table_one_and_both_plots",
                                          "test_report_curves_come_from_each_exports_run_log",
                                          "test_grid_columns_are_labelled_with_their_prompts_wrapped_to_the_cell"]},
    "test_faults.py": {"recipe": ["test_an_interrupted_recipe_exits_non_zero_and_leaves_its_stage_unfinished"],
                       "unit": ["test_resume_last_picks_the_newest_valid_checkpoint_of_any_kind"]},
    "test_gpu_check.py": {"recipe": ["test_dry_run_smoke", "test_dry_run_real_recipes"],
                          "stage": ["test_dry_run_fsdp_kill_and_resume", "test_dry_run_bench"]},
    "test_grpo.py": {"stage": ["test_flow_grpo_objective_is_ppo_plus_kl_on_group_advantages_and_it_exports",
                               "test_ddim_grpo_full_fine_tuning_with_per_term_advantages_and_shared_noise",
                               "test_interrupted_and_resumed_grpo_ends_identical",
                               "test_grpo_on_two_processes_counts_every_ranks_queries"]},
    "test_preferences.py": {"stage": ["test_pickapic_conversion_stage", "test_preferences_stage_samples_scores_and_pairs"]},
    "test_pretrain.py": {"unit": ["test_a_latent_cache_batch_gives_the_loss_of_the_video_batch"]},
    "test_real_models.py": {"recipe": ["test_sd15_dpo_recipe_runs_as_a_miniature", "test_wan_lora_recipe_runs_as_a_miniature",
                                       "test_wan_grpo_recipe_runs_as_a_miniature"]},
    "test_recipe.py": {"unit": ["test_recipe_errors_name_the_problem"]},
    "test_reward_model.py": {"stage": ["test_reward_model_learns_colour_preferences",
                                       "test_reward_model_stage_on_a_clip_backbone_with_lora",
                                       "test_interrupted_and_resumed_reward_model_ends_with_the_same_weights"]},
    "test_run_dir.py": {"unit": ["test_a_stale_lock_from_a_killed_run_is_taken_over_with_a_warning",
                                 "test_replacing_an_export_keeps_the_old_one_until_the_new_one_is_in",
                                 "test_atomically_written_files_honour_the_umask"]},
    "test_rwr.py": {"stage": ["test_the_stage_fits_its_samples_weighted_by_their_rewards",
                              "test_rwr_run_leaves_table_samples_and_export"]},
    "test_safe_loading.py": {"stage": ["test_no_secret_reaches_the_run_directory_or_the_console",
                                       "test_a_failing_run_logs_its_error_masked_and_hydra_prints_no_overrides",
                                       "test_wandb_run_metadata_holds_no_secret",
                                       "test_resuming_a_tampered_checkpoint_runs_none_of_its_code"]},
    "test_sft.py": {"stage": ["test_sft_lora_from_an_export_trains_only_the_denoiser_lora"]},
    "test_sweep.py": {"stage": ["test_a_real_multirun_is_summarised"]},
    "test_vader.py": {"stage": ["test_the_stage_backpropagates_through_exactly_its_last_k_sampling_steps",
                                "test_vader_raises_the_reward_and_leaves_table_samples_and_export",
                                "test_memory_and_optimisation_options_train",
                                "test_interrupted_and_resumed_vader_ends_with_the_same_lora",
                                "test_vader_on_each_denoiser_family_with_checkpointing"]},
    "test_vader_i2v.py": {"stage": ["test_vader_aligns_an_image_to_video_model_for_temporal_consistency",
                                    "test_vader_with_a_prompt_reward_on_an_image_to_video_model",
                                    "test_the_stage_backpropagates_through_the_last_step_of_the_last_clip_only",
                                    "test_long_horizon_scores_every_clip_and_trains_only_through_the_last"]},
}


def group_of(file: str, test: str) -> str:
    """The group of test function `test` of tests/`file`."""
    if file not in FILES:
        raise KeyError(f"tests/{file}: no group; add it to FILES in tests/groups.py (one of {list(GROUPS)})")
    return next((group for group, tests in EXCEPTIONS.get(file, {}).items() if test in tests), FILES[file])
