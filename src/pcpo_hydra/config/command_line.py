"""What `pcpo-train` checks on its command line before Hydra runs: misspelt keys, unknown options, the output folder.

Hydra answers a misspelt key (`algorithm.clip_rnge=0.1`) by suggesting to add it
(`+algorithm.clip_rnge`), and an output folder it cannot create with a traceback; both happen
while it composes, before `main` sees a config. So the console entry composes once itself,
dropping each override Hydra cannot apply, and names the key it probably meant. A group option no
config folder has (a plugin's, with the plugin not installed) Hydra answers with its search path
over a dozen lines; here it is one line naming the option and the group's options.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from pcpo_hydra.config.hydra_setup import config_dir, register_resolvers
from pcpo_hydra.config.validation import ConfigError
from pcpo_hydra.paths import unwritable

# Hydra's words for an override whose key the config lacks (`key=v`, `~key`).
_NOT_APPLIED = re.compile(r"Could not override '([^']+)'|Could not delete from config\. '([^']+)' does not exist")


def command_line_problems(argv: list[str], config_dir: str, config_name: str) -> list[str]:
    """One line per misspelt key or unwritable output folder; [] where Hydra's own handling should speak."""
    args = get_args_parser().parse_args(argv)  # Hydra's own parser (it has no public one): flags mean what they mean there
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path \
            or args.config_dir or args.experimental_rerun:
        return []
    try:
        overrides = [_one_job(override) for override in OverridesParser.create().parse_overrides(args.overrides)]
    except HydraException:
        return []  # Hydra's parse error says it best
    register_resolvers()  # the output folder below is read through conf/'s resolvers
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            cfg, misspelt = _compose_without_unknown_keys(args.config_name or config_name, overrides)
        except MissingConfigException as error:
            return _unknown_option(error)
        problems = [_did_you_mean(cfg, key) for key in misspelt]
        if cfg is None or args.cfg:  # --cfg only prints the config: it writes no output folder
            return problems
        where = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
        output = OmegaConf.select(cfg, where)
    problem = unwritable(output)
    if problem:
        problems.append(f"{where}={output!r}: cannot write there ({problem}); fix: run pcpo-train from a "
                        f"writable folder, or set {where}=<writable folder>")
    return problems


def _compose_without_unknown_keys(config_name: str, overrides: list[str | None]) -> tuple[DictConfig | None, list[str]]:
    """The config composed with every override Hydra can apply, and the keys of those it cannot.

    The config is None when composing failed for another reason, which Hydra then reports itself.
    """
    overrides, misspelt = list(overrides), []
    while True:
        try:
            return compose(config_name, [o for o in overrides if o], return_hydra_config=True), misspelt
        except MissingConfigException:
            raise
        except ConfigCompositionException as error:
            found = _NOT_APPLIED.search(str(error))
            key = found and (found.group(1) or found.group(2))
            unknown = [i for i, o in enumerate(overrides) if o and _key_of(o) == key]
            if not unknown:
                return None, misspelt
            misspelt.append(key)
            overrides[unknown[0]] = None
        except HydraException:
            return None, misspelt


def _unknown_option(error: MissingConfigException) -> list[str]:
    """'<group>=<option>: no such option; ...' when a group's option file is missing; [] for Hydra's own cases."""
    group, _, option = (error.missing_cfg_file or "").rpartition("/")
    if not group or not error.options:  # not a group option (a missing primary config): Hydra says it
        return []
    return [f"{group}={option}: no such option; {group} is one of {', '.join(error.options)} "
            f"(an option a plugin adds needs the plugin installed)"]


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


def config_error(command: str, error: ConfigError) -> NoReturn:
    """Report a config the machine cannot run, with exit status 2."""
    print(f"{command}: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def checked_command(command: str, config_name: str, hydra_main: Callable[[], object]) -> None:
    """An entry point: its command line checked first (Hydra's own errors there say no fix), then Hydra."""
    problems = command_line_problems(sys.argv[1:], config_dir(), config_name)
    if problems:
        config_error(command, ConfigError(problems))
    hydra_main()
