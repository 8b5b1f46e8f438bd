"""The run config: its schema (pydantic models), loading it (YAML and `--set` overrides) and documenting it.
No torch here: `ddpm config validate` and `ddpm --help` must stay fast."""
from ddpm_cli.config.docs import config_to_dict, reference_markdown, to_commented_yaml
from ddpm_cli.config.loading import apply_overrides, load_config, parse_override, validate_config
from ddpm_cli.config.schema import (DataConfig, DiffusionConfig, EarlyStoppingConfig, LoggingConfig, ModelConfig,
                                    RunConfig, TrainConfig, refuse_identity_change)

__all__ = ["config_to_dict", "reference_markdown", "to_commented_yaml", "apply_overrides", "load_config",
           "parse_override", "validate_config", "DataConfig", "DiffusionConfig", "EarlyStoppingConfig",
           "LoggingConfig", "ModelConfig", "RunConfig", "TrainConfig", "refuse_identity_change"]
