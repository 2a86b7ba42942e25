"""An algorithm from outside pcpo_hydra: reward-weighted regression, to prove that methods plug in.

Nothing in `src/pcpo_hydra/` names it. Its schema registers from `rwr_algorithm.schemas` (found by
walking the target's packages), its preset is conf/algorithm/rwr.yaml (added through Hydra's
search path), and the loop trains it through the Algorithm protocol alone.
"""
