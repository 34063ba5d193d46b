"""Run a function on ``degree`` local rank processes joined in one process group (tests, benchmarks, one node
without Ray): gloo on the CPU, NCCL with one GPU per rank (``cuda:<rank>``).

The parent opens the rendezvous store on a free loopback port and starts the ranks; each rank joins the group,
calls ``fn(group, device, *args)`` and sends back its result (serialised with ``torch.save``, so tensors survive
the child's exit). Ranks fork from a ``forkserver`` that has imported torch, diffusers and ``fn``'s module once:
importing them costs ~4 s of CPU per process, which would otherwise dominate a tiny run on a small machine.
(The server never touches a GPU, so CUDA is first initialised in the ranks.) Any rank failing, or the deadline passing, stops all of them and raises with their tracebacks.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .comm import Rendezvous, join_group, open_rendezvous

__all__ = ["RankFailedError", "run_local_ranks"]


class RankFailedError(RuntimeError):
    """A rank raised, died or missed the deadline; the message carries what each failing rank reported."""


def _rank_main(fn: Callable[..., Any], rank: int, degree: int, rendezvous: Rendezvous, device: str,
               args: tuple, results: mp.Queue, timeout_s: float) -> None:
    try:
        group = join_group(rendezvous, rank, degree, device, timeout_s)
        try:
            value = fn(group, torch.device(device), *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))


def run_local_ranks(fn: Callable[..., Any], degree: int, args: tuple = (), device: str = "cpu",
                    timeout_s: float = 300.0) -> list[Any]:
    """``[fn(group, device_r, *args) for each rank r]``, run concurrently in ``degree`` processes.

    ``fn`` must be importable by name (a module-level function). ``device``: ``cpu`` (gloo) or ``cuda`` (NCCL,
    rank ``r`` on ``cuda:r``; needs ``degree`` local GPUs).
    """
    if device == "cuda" and torch.cuda.device_count() < degree:
        raise RankFailedError(f"{degree} ranks need {degree} local GPUs; {torch.cuda.device_count()} visible")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__, "pipeline.sequence_parallel", fn.__module__])
    results = context.Queue()
    store, rendezvous = open_rendezvous("127.0.0.1")
    processes = [
        context.Process(target=_rank_main, name=f"sp-rank-{rank}", daemon=True,
                        args=(fn, rank, degree, rendezvous, device if device == "cpu" else f"cuda:{rank}", args,
                              results, timeout_s))
        for rank in range(degree)
    ]
    for process in processes:
        process.start()
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) + len(failures) < degree:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    failures[-1] = f"rank processes died without reporting: {dead}"
                elif time.monotonic() > deadline:
                    failures[-1] = f"deadline of {timeout_s:.0f} s passed"
                else:
                    continue
                break
            if ok:
                values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures[rank] = payload
                break  # the others are likely blocked in a collective with the failed rank
    finally:
        for process in processes:
            process.join(timeout=5 if not failures else 0.5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        del store
    if failures:
        raise RankFailedError("\n".join(f"rank {rank}:\n{text}" for rank, text in sorted(failures.items())))
    return [values[rank] for rank in range(degree)]
