"""The stop request: every rank agrees to stop, and every rank can name why.

A signal relayed by srun reaches the ranks of a multi-node job at different moments: the rank that
logs (rank 0) may agree to stop because another rank was signalled first. Two real gloo processes.
"""

import os
import signal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.runtime.comm import Collectives
from pretrain.runtime.distributed import free_port
from pretrain.train.stop import StopRequested


def _rank(rank: int, port: int, signalled: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        comm = Collectives(torch.device("cpu"))
        stop = StopRequested(log=lambda *_: None)
        rounds = []
        for round_signals in signalled:
            for sig in round_signals.get(rank, ()):
                os.kill(os.getpid(), sig)  # the real handler, as srun's relay would run it
            rounds.append((stop.agreed(comm), stop.reason))
        results[rank] = rounds
    finally:
        dist.destroy_process_group()


def test_every_rank_names_the_signal_that_only_another_rank_has_received():
    # Round 1: nobody signalled. Round 2: only rank 1 got SIGUSR1. Round 3: rank 0 then gets SIGTERM.
    plan = [{}, {1: [signal.SIGUSR1]}, {0: [signal.SIGTERM]}]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), plan, results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank][0] == (False, ""), rank
        assert results[rank][1] == (True, "SIGUSR1"), rank
        # Both requests are known by then; the ranks name the same one (the higher signal number).
        assert results[rank][2] == (True, "SIGTERM"), rank
