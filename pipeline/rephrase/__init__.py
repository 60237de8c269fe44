"""Rephrase mode: recycle the web stage's scored pages into textbook-like text by edu-score bucket.

`stage.run_stage` is the `rephrase` stage (registered in `pipeline.run.STAGES`); `plan` decides buckets, policy and
requests; `chunks` splits long pages to fit the model's context; `judge` judges the answers (validators +
`fidelity`); `templates` loads `prompts/rephrase/*.j2`.
"""
