"""Built-in baseline data sources, one module each; each registers itself in
`msd.baselines.data.BASELINE_DATA` when imported (the registry discovers this package)."""
