"""cai: a Constitutional AI (SL-CAI + RL-CAI) pipeline."""

__version__ = "0.1.0"
