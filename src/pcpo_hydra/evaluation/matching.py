"""Placeholder replaced by the eval-stats branch."""
EVAL_HISTORY = "eval_history.jsonl"
