"""The torchrun entry point: rank 0 runs `crv`, the other ranks serve the layer-split
transcoder training (`crv.transcoders.distributed`).

    torchrun --nproc_per_node=N -m crv.cli.torchrun [crv overrides ...]
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

from crv.transcoders import distributed
from crv.transcoders.distributed import STOP, WAIT, broadcast_json, serve


def main() -> None:
    """`torchrun ... -m crv.cli.torchrun [crv overrides]`."""
    if "LOCAL_RANK" not in os.environ:
        sys.exit(
            "crv.cli.torchrun: start it with torchrun, e.g. "
            "torchrun --nproc_per_node=2 -m crv.cli.torchrun experiment=smoke"
        )
    dist.init_process_group("gloo", timeout=WAIT)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank()
    try:
        if rank == 0:
            from crv.cli.main import main as crv_main

            try:
                crv_main()
            finally:
                if not distributed.busy:
                    broadcast_json(STOP, 0)
                    dist.barrier()
        else:
            logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
            serve()
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        # A serving rank has nothing left to clean up. Leave without interpreter
        # finalisation, where gloo's threads still alive can abort the process
        # ("terminate called without an active exception"): seen once in 6 test runs.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
