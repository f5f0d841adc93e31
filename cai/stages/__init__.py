"""What `python -m cai.pipeline stage=...` runs, top to bottom: sl, rl, dpo."""
