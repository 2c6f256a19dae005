"""Configuration: the schema and loading (load), the checks against the registries (checks), a
run's resolved recipe (recipe) and the torch stand-in that lets planning read method files
without torch (torch_stand_in). `agcl.config` re-exports what loading offers; `checks` and
`recipe` import the method registry and are imported by name."""

from agcl.config.load import (
    NOISE_TWIN_SUFFIX,
    SCHEMA_PATH,
    ConfigError,
    Layout,
    comparison_references,
    config_rules,
    dataset_config,
    default_roles,
    eval_patch,
    expected_runs,
    load_config,
    method_eval_config,
    method_train_config,
    noise_twins,
    roles_of,
    train_override_problems,
    train_patches,
    validate_config,
)

__all__ = ["NOISE_TWIN_SUFFIX", "SCHEMA_PATH", "ConfigError", "Layout", "comparison_references",
           "config_rules", "dataset_config",
           "default_roles", "eval_patch", "expected_runs", "load_config", "method_eval_config",
           "method_train_config", "noise_twins", "roles_of", "train_override_problems",
           "train_patches", "validate_config"]
