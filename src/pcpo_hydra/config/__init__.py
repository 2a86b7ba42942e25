"""Structured-config schemas and the one `validate(cfg)` that runs before any model is built."""

from pcpo_hydra.config.validation import ConfigError, trained_steps, validate

__all__ = ["ConfigError", "trained_steps", "validate"]
