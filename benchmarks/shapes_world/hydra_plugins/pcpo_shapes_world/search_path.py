"""Adds the shapes world's config groups to every Hydra app's search path, `pcpo-train` included.

Appended, not prepended: the core's `conf/` comes first, so an option the plugin shares a name
with can never replace the core's. Importing this pulls in nothing but Hydra, so `pcpo-train --help`
stays fast with the plugin installed.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "pcpo-shapes-world"
CONF = "pkg://pcpo_shapes_world.conf"


class ShapesWorldSearchPath(SearchPathPlugin):
    """Makes `model=world_sd prompts=world reward=world_all` resolvable once the plugin is installed."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider=PROVIDER, path=CONF)
