"""The inference runtime: a loaded model, its contexts, the generation loop and sampling.

``loaded`` (weights + tokenizer + template, the one place contexts are made), ``llm`` (``LLM`` = a
loaded model + one context), ``steps`` (one sequence's step machine), ``generation`` (the
single-sequence loop), ``completions`` / ``openai_shapes`` (OpenAI-shaped results), ``sampling``,
``footprint`` (memory estimate, KV types), ``sysinfo`` (CPUs and memory of the process) and
``default_model`` (the model used when none is named: downloaded once, cached).
The public names are re-exported lazily by :mod:`pyllm`.
"""
