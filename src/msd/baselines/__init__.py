"""Baselines the paper compares MSD with (SFT, DPO and its rDPO / IPO losses, KTO, ORPO, SimPO),
each on TRL's own trainer: `msd baseline METHOD`.

Modules: `options` (the `baseline` config section), `methods` (METHODS: one TRL trainer per
method), `data` (BASELINE_DATA sources, user files, the rows TRL reads), `sources/` (built-in
sources: self_generated), `run` (the run, laid out like `msd train`), `cli`. Importing this
package does not import TRL; only building a trainer does.
"""
