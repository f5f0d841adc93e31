"""`python -m cai.pipeline stage=sl|rl|dpo [config=FILE] key=value ...`

Parses and checks the whole config (every value, in well under a second, before anything is written), then
runs the stage (cai.stages.sl, cai.stages.rl, cai.stages.dpo). `--help` lists every setting of a stage.
"""

from __future__ import annotations

import sys

from cai.config import help_text, load_config, stage_schemas
from cai.errors import CaiError, cli_main
from cai.launch import init as init_launch


def run_stage(cfg) -> dict:
    """Dispatch on the stage name. The stage modules import torch and the trainers, so each is imported only
    when it runs: reading and checking a config stays torch-free and fast."""
    if cfg.stage == "sl":
        from cai.stages.sl import run_sl  # heavy: torch, transformers, trl

        return run_sl(cfg)
    elif cfg.stage == "rl":
        from cai.stages.rl import run_rl  # heavy: torch, transformers, trl

        return run_rl(cfg)
    elif cfg.stage == "dpo":
        from cai.stages.dpo import run_dpo  # heavy: torch, transformers, trl

        return run_dpo(cfg)
    raise CaiError(f"stage={cfg.stage}: expected sl, rl or dpo")


@cli_main
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv:
        stage = next((a.split("=", 1)[1] for a in argv if a.startswith("stage=")), None)
        print(__doc__)
        for name, schema in stage_schemas().items():
            if stage in (None, name):
                print(f"stage={name} settings:")
                print("\n".join(help_text(schema)))
        return 0
    cfg = load_config(argv)
    init_launch()  # under accelerate launch: the process group, before any trainer makes one
    run_stage(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
