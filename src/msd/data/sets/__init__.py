"""Built-in datasets, one module per family; each registers itself in `msd.data.DATASETS`."""
