"""The schema registry and the one `validate(cfg)` that runs before any model is built."""

from pcpo_hydra.config.validation import ConfigError, validate

__all__ = ["ConfigError", "validate"]
