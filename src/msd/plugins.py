"""Plugins: packages that add entries to msd's registries without the core importing them.

A plugin is a module that, when imported, registers what it brings (languages, datasets, a
model source, a judge, a model family...). msd loads, once and before the first registry
lookup:

- the bundled plugins (`BUNDLED`: the model organism, the `smollm2` model source), and
- every module named by an installed package's entry points in the group `msd.plugins`:

      [project.entry-points."msd.plugins"]
      mything = "mypackage.msd_plugin"

A test or a script can also just call `SOME_REGISTRY.register(...)` itself.
Set MSD_PLUGINS=0 to load none (the core then runs without the organism).

msd's own packages that extend the core the same way (`PARTS`: the `baseline` config section
of msd.baselines) load first, always, MSD_PLUGINS=0 or not: a config reads the same either way.
"""

from __future__ import annotations

import importlib
import os
import warnings

PARTS = ("msd.baselines.options",)
BUNDLED = ("msd.organism.plugin", "msd.sources.smollm2")
GROUP = "msd.plugins"

_state = {"loaded": False}


def names() -> list[str]:
    """Module names of the plugins msd loads (after msd's own PARTS)."""
    if os.environ.get("MSD_PLUGINS") == "0":
        return []
    found = list(BUNDLED)
    try:
        from importlib.metadata import entry_points

        found += [ep.value for ep in entry_points(group=GROUP) if ep.value not in found]
    except Exception as e:  # a broken installed distribution must not break msd
        warnings.warn(f"msd: cannot list plugins ({e})")
    return found


def load() -> None:
    """Import every plugin once (re-entrant: a plugin's own registry lookups see what is loaded)."""
    if _state["loaded"]:
        return
    _state["loaded"] = True
    for name in [*PARTS, *names()]:
        importlib.import_module(name.split(":")[0])
