"""Settings: the schema (typed dataclasses with help and environment names), loading and precedence,
strategies, the user's accelerate file, exit codes. Imports nothing else of train.

`train.config` is the facade the rest of the package imports the run configuration from."""

from train.config.load import ENV_VARS, allowed_keys, dump_yaml, env_names, help_text, load_config, resolve_batch
from train.config.schema import (
                               CONFIG_ENV,
                               SIZE_KEYS,
                               ConfigError,
                               DataConfig,
                               LaunchConfig,
                               ModelConfig,
                               RunConfig,
                               selected_strategy,
                               strategy_name,
)

__all__ = ["CONFIG_ENV", "ENV_VARS", "SIZE_KEYS", "ConfigError", "DataConfig", "LaunchConfig", "ModelConfig",
           "RunConfig", "allowed_keys", "dump_yaml", "env_names", "help_text", "load_config",
           "resolve_batch", "selected_strategy", "strategy_name"]
