"""msd: Multilingual Self-Distillation for chat LLM safety.

The same model is student (query in the target language) and frozen teacher (target query,
its English version and a safety instruction); the student learns to match the teacher token
by token, weighted by Dual-Perspective Safety Weighting (DPSW).
"""

__version__ = "0.1.0"
