"""Model sources that msd knows by name (`model.name_or_path: NAME`, `--model NAME`).

Each module registers one entry in `msd.models.MODEL_SOURCES` and is loaded as a bundled plugin
(`msd.plugins.BUNDLED`). The model organism registers `organism` the same way from its package.
"""
