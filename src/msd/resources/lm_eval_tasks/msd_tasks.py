"""Hooks the shipped lm-eval task YAMLs call (`!function msd_tasks.<name>`).

lm-eval imports this file by path; the logic lives in msd.eval.utility.
"""

from msd.eval.utility import load_mgsm, load_xcopa, mgsm_process_results  # noqa: F401
