"""The models the replay knows, by name: one list for the report, the CLI and its --help
(no torch import here, so `recsys --help` stays fast). offline_eval/report.py builds each."""

DEFAULT_MODELS = ("pop_static", "pop_online", "pop_online_decay", "itemknn_online", "sknn_online", "hybrid", "mf_static",
                  "mf_online", "sasrec_static", "nested", "nested_slow_only")
# Each retrains the nested model without one level (`--models ablations` runs them all).
ABLATIONS = ("nested_no_user_fast", "nested_no_user_mid", "nested_no_population", "nested_no_sequence",
             "nested_no_association")
# The population level's two clocks side by side (`nested` is whichever POPULATION_CLOCK names);
# the nested model taking every event for a view (on a log with kinds of feedback: their ablation).
VARIANTS = ("nested_pop_by_time", "nested_pop_by_events", "nested_as_views")
AVAILABLE_MODELS = DEFAULT_MODELS + ABLATIONS + VARIANTS + ("oracle",)  # oracle: synthetic logs only
