"""Synthetic textbooks: taxonomy × audience × format prompt specs, sent through the LLM layer, judged and kept.

Modules: taxonomy (topic YAML), templates (Jinja2 formats, prompt_id), sampler (coverage-driven specs), seeds
(web-seeded prompts), validate (drop reasons), diversity (MinHash guard), stage (`run_stage`), expand
(`textbook topics expand`). Heavy imports stay inside functions.
"""
