"""msd: Multilingual Self-Distillation for chat LLM safety.

The same model is student (query in the target language) and frozen teacher (target query,
its English version and a safety instruction); the student learns to match the teacher token
by token, weighted by Dual-Perspective Safety Weighting (DPSW).

Shape letters, used in tensor names across the package (`logp_BTV`, `mask_BT`, `asr_L`):

    B  batch rows (prompts or responses)      V  vocabulary
    P  prompt columns (left-padded)           H  hidden size
    T  response tokens (right-padded)         K  teacher top-K tokens (DPSW)
    S  sequence columns, prompt + response    L  languages
    G  generated tokens of a rollout          N  scored (unmasked) response tokens, flattened
    C  tokens per loss chunk                  R  rows per row block
    M  vocabulary blocks (two-level sampling)

See docs/ARCHITECTURE.md for the modules and where each extension point lives.
"""

__version__ = "0.1.0"
