"""The plugin's config groups, found by Hydra at pkg://pcpo_shapes_world.conf (a package, so it ships in the wheel)."""
