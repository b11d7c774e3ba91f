"""Offline tools, each behind a CLI subcommand: ``convert`` (checkpoints -> GGUF), ``quantize``,
``perplexity`` (and KL divergence) and ``throughput`` (llama-bench-style pp/tg).

The runtime (:mod:`pyllm.runtime`) never imports these (tests/test_generate.py checks).
"""
