"""Hydra discovers plugins by importing every module under the `hydra_plugins` namespace package."""
