"""What `pcpo-train` checks on its command line before Hydra runs: misspelt keys and the output folder.

Hydra answers a misspelt key (`algorithm.clip_rnge=0.1`) by suggesting to add it
(`+algorithm.clip_rnge`), and an output folder it cannot create with a traceback; both happen
while it composes, before `main` sees a config. So the console entry composes once itself,
dropping each override Hydra cannot apply, and names the key it probably meant.
"""

from __future__ import annotations

import difflib
import re

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import DictConfig

from pcpo_hydra.paths import unwritable

_NOT_APPLIED = re.compile(r"Could not (?:override|append to|delete from) '([^']+)'")


def command_line_problems(argv: list[str], config_dir: str, config_name: str) -> list[str]:
    """One line per misspelt key or unwritable output folder; [] where Hydra's own handling should speak."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path \
            or args.config_dir or args.experimental_rerun:
        return []
    try:
        overrides = [_one_job(override) for override in OverridesParser.create().parse_overrides(args.overrides)]
    except HydraException:
        return []  # Hydra's parse error says it best
    misspelt: list[str] = []
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        while True:
            try:
                cfg = compose(args.config_name or config_name, [o for o in overrides if o], return_hydra_config=True)
                break
            except ConfigCompositionException as error:
                found = _NOT_APPLIED.search(str(error))
                key = found.group(1) if found else None
                dropped = [i for i, o in enumerate(overrides) if o and _key_of(o) == key]
                if not dropped:
                    return [_did_you_mean(None, k) for k in misspelt]  # another problem: Hydra reports it next
                misspelt.append(key)
                overrides[dropped[0]] = None
            except HydraException:
                return [_did_you_mean(None, k) for k in misspelt]
        problems = [_did_you_mean(cfg, key) for key in misspelt]
        output = cfg.hydra.sweep.dir if args.multirun else cfg.hydra.run.dir
    where = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    problem = unwritable(output)
    if problem:
        problems.append(f"{where}={output!r}: cannot write there ({problem}); fix: run pcpo-train from a "
                        f"writable folder, or set {where}=<writable folder>")
    return problems


def _one_job(override) -> str | None:
    """The override as one job of a sweep would see it (its first value); None for a sweep without one."""
    if not override.is_sweep_override():
        return override.input_line
    if override.is_interval_sweep():
        return None
    first = next(iter(override.sweep_string_iterator()), None)
    return None if first is None else f"{override.get_key_element()}={first}"


def _key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~").partition("@")[0]


def _did_you_mean(cfg: DictConfig | None, key: str) -> str:
    """'<key>: no such key; did you mean <closest>?', looked up among the keys where the key is missing."""
    if cfg is None:
        return f"{key}: no such key (check its spelling with pcpo-train --cfg job)"
    parts = key.split(".")
    node, depth = cfg, 0
    while depth < len(parts) and isinstance(node, DictConfig) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    where = ".".join(parts[:depth]) or "the top level"
    keys = [k for k in node.keys() if k != "hydra" and not str(k).startswith("_")] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(parts[depth] if depth < len(parts) else "", [str(k) for k in keys], n=1)
    if close:
        meant = ".".join([*parts[:depth], close[0], *parts[depth + 1:]])
        return f"{key}: no such key; did you mean {meant}?"
    return f"{key}: no such key; {where} has {', '.join(map(str, keys)) or 'no keys'}"
