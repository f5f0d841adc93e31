"""Trainers: SFT, the preference model, DPO, RLOO/GRPO and PPO, each `train_*(...)` with one signature shape."""
