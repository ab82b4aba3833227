"""Evaluation: safety per language, over-refusal, utility, language fidelity.

Every evaluation writes one record per (benchmark, language, query, sample) to
`<out>/records.jsonl` first; `metrics.json`, reports and plots are computed from those records
alone (STYLE rule 10), so they can be rebuilt without generating anything again.

Modules:
    judges      the Judge interface (JudgeItem, Verdict, JUDGES, `get_judge`), one module per judge:
      .keyword  multilingual refusal lexicon (cheap, weak proxy)
      .llm      any OpenAI-compatible chat endpoint as a three-way safe/unsafe/invalid judge
      .guard    Hugging Face guard classifiers (Qwen3Guard-Gen, Llama Guard)
    metrics     ASR with Wilson intervals, over-refusal, fidelity, utility scores
    langid      offline language identification (py3langid)
    records     run-folder layout, record keys, resume
    safety      `evaluate`: generate, judge, write records, recompute metrics
    overrefusal refusal rate on benign prompts (same records, same metrics)
    utility     lm-evaluation-harness on the vendored MGSM/XCOPA files, offline
    cli         `msd eval safety|overrefusal|utility`
"""
