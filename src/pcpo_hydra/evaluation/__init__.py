"""Evaluation during training: a fixed prompt set, fixed noise, several rewards and drift from the base model.

`schemas` (torch-free) holds the `eval` group's schema; `callback` the Trainer callback that runs it.
"""
