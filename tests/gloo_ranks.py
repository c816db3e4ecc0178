"""Run one function on W gloo ranks over loopback and collect what each rank returned.

The exactness tests of the distributed loss compare every rank's results with one process
holding the global batch; this is the one place that spawns those ranks. Two things make it
trustworthy under load: every rank waits at a barrier before the process group is torn down
(a rank must not close its connections while a peer is still finishing a collective), and a
rank that dies natively (SIGABRT, SIGSEGV) leaves its Python stack in a file that the test
failure prints, instead of only "terminated with signal". A rank that has delivered its results
leaves with ``os._exit(0)``: gloo's native teardown at interpreter exit has aborted a rank on a
loaded two-core machine after every result was written, failing a test whose work had passed.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.loopback import free_port


def _rank_main(rank: int, world: int, port: int, out: Path, body: Callable, args: tuple) -> None:
    with open(out / f"rank{rank}.stack", "w") as stack:
        faulthandler.enable(file=stack, all_threads=True)
        try:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
            try:
                torch.set_num_threads(1)
                results = body(rank, world, *args)
                torch.save(results, out / f"rank{rank}.part")
                os.replace(out / f"rank{rank}.part", out / f"rank{rank}.pt")
                dist.barrier()
            finally:
                dist.destroy_process_group()
        finally:
            faulthandler.disable()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(body: Callable[..., Any], world: int, out: Path, *args: Any) -> list:
    """``body(rank, world, *args)`` on ``world`` gloo ranks (a picklable module-level function);
    its return value on each rank, in rank order, loaded with ``weights_only`` (register any
    class it holds with ``torch.serialization.add_safe_globals``). ``out`` is an empty scratch folder."""
    try:
        mp.start_processes(_rank_main, args=(world, free_port(), out, body, args), nprocs=world,
                           start_method="spawn")
    except mp.ProcessExitedException as error:
        stacks = {path.name: path.read_text() for path in sorted(out.glob("rank*.stack")) if path.read_text()}
        raise AssertionError(f"{error}; native stacks: {stacks or 'none written'}") from error
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world)]
