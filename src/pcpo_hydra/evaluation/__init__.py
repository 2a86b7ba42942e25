"""Evaluation during training: a fixed prompt set, fixed noise, several rewards and drift from the base model.

`schemas` (torch-free) holds the `eval` group's schema; `callback` the Trainer callback that runs it.
For pcpo-eval, torch-free too: `statistics` (per-prompt means, mixed models), `matching` (the
checkpoint of a run that reached a given evaluation reward) and `report` (the markdown page and plots).
"""
