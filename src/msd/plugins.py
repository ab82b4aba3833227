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

A plugin fails alone: one that raises when imported, registers a name that exists already, or
names a module that is not installed is named in one warning line on stderr
(`msd: warning: plugin 'x.y' skipped (...)`) and skipped, with whatever it registered before it
failed taken back; every command, `msd --help` included, keeps working
(`msd.registry.load_plugins` imports them).
Fixed bug: such a plugin broke every command with a traceback that did not name it.
"""

from __future__ import annotations

import os
import sys

from msd.errors import printable

PARTS = ("msd.baselines.options",)
BUNDLED = ("msd.organism.plugin", "msd.sources.smollm2")
GROUP = "msd.plugins"


def names() -> list[str]:
    """Module names of the plugins msd loads (after msd's own PARTS)."""
    if os.environ.get("MSD_PLUGINS") == "0":
        return []
    found = list(BUNDLED)
    try:
        from importlib.metadata import entry_points

        found += [ep.value for ep in entry_points(group=GROUP) if ep.value not in found]
    except Exception as e:  # a broken installed distribution must not break msd
        print(f"msd: warning: cannot list plugins ({printable(' '.join(str(e).split()))[:300]})", file=sys.stderr)
    return found
