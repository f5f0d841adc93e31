"""Running a stage under `accelerate launch` (several GPUs, or nodes): who does what.

One process, the main one (rank 0), does everything that reads or writes the run: it holds the run lock,
generates, labels, appends to the store, writes the data files, metrics, models and summaries. The others
wait for it (`on_main`), then every process joins the trainer (TRL's SFT/reward/DPO/RLOO/GRPO trainers, or the
PPO loop) on the data the main process wrote; saving gathers the weights from every process and the main
process writes them (`cai.train.common.save_trained`).

Why not split generation across the launched processes too: the store, its plans and the lock assume one
writer, and `shard=i/n` already splits SL generation across independent processes or nodes with an exact
merge, without a process group whose collectives time out. So a launched run generates on one GPU (use the
vLLM backend for speed) and trains on all of them.

Without `accelerate launch` (WORLD_SIZE unset or 1) the one process is the main one and nothing waits.
"""

from __future__ import annotations

import os
import sys
import traceback

from cai.errors import CaiError

# The others wait for the main process at a collective while it generates and labels, which can take
# hours; torch's default (10-30 min) would kill a healthy run. CAI_LAUNCH_TIMEOUT (seconds) overrides it.
DEFAULT_TIMEOUT_S = 24 * 3600


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


_wait_group = None  # a gloo process group for waiting on the main process (see init)


def init() -> None:
    """Start the process group before any trainer does, with a long timeout (see DEFAULT_TIMEOUT_S).

    On a machine without CUDA the processes talk over gloo (the CPU test launches two processes this way).
    Trainers created later reuse this group (accelerate's PartialState is a process-wide singleton). Waiting
    for the main process goes through a separate gloo group: a NCCL collective would keep every other GPU
    spinning for as long as the main process generates.
    """
    global _wait_group
    if not launched() or _wait_group is not None:
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    timeout = timedelta(seconds=int(os.environ.get("CAI_LAUNCH_TIMEOUT", DEFAULT_TIMEOUT_S)))
    PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)
    _wait_group = dist.new_group(backend="gloo", timeout=timeout)


def on_main(fn):
    """Run fn() on the main process only; the others wait until it returns. Returns fn's result on the main
    process and None elsewhere. Launched, a failure of fn ends every process: the main one prints it first (one
    line for a CaiError, as `cli_main` does; the traceback otherwise), then all exit with code 2 (CaiError) or 1.
    Printing before the others are told matters: the launcher kills the remaining processes once one has exited.
    """
    if not launched():
        return fn()
    import torch.distributed as dist

    init()
    result, code = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - reported here, then every process exits
            code = 2 if isinstance(e, CaiError) else 1
            if code == 2:
                print(f"error: {e}", file=sys.stderr, flush=True)
            else:
                traceback.print_exc()
                sys.stderr.flush()
    box = [code]
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    if box[0] is not None:
        raise SystemExit(box[0])
    return result


def sharded_launch() -> str | None:
    """The name of the launch config's weight sharding ("DeepSpeed ZeRO-3" or "FSDP"), or None.

    Models cai uses outside a trainer (the PM that scores answers in stage=rl, PPO's frozen reference) must be
    whole on every process; under these configs transformers may load them partitioned (ZeRO-3's zero.Init) or
    on the meta device (FSDP's low-memory loading), so stage=rl refuses them up front.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and \
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def barrier() -> None:
    """Wait until every process gets here (after the main process wrote something the others read)."""
    if launched():
        import torch.distributed as dist

        init()
        dist.barrier(group=_wait_group)
