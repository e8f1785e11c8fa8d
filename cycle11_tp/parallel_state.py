"""Tensor parallelism's plumbing: which rank this process is, the collectives the model needs, and
the channel that carries each step from rank 0 to the others.

A tensor-parallel group is `world_size` processes, each holding 1/world_size of every weight matrix
(parallel_layers.py). They meet through a TCPStore, a small key-value server of torch.distributed:
rank 0 hosts it (or torchrun's agent does, on many nodes), every process connects to it, and the
process group (gloo on a CPU, NCCL on CUDA) finds its peers through it. The group is an object
owned by the engine, not torch.distributed's default group: two engines in one process do not share it.

The model needs three collectives: all-reduce (sum) after each row-parallel layer and the vocab-split
embedding, gather of the logits to rank 0, and max/min all-reduces when the engine starts (int8
scales, KV blocks). gloo has all of them. Every collective waits at most COLLECTIVE_TIMEOUT for the
other ranks: a rank that died or hangs becomes an error on the others, not a hang.
"""

import datetime
import os
import pickle
import time

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)   # the longest one rank waits for the others
STARTUP_TIMEOUT_S = 300.0      # the longest rank 0 waits for every worker to connect
IDLE_WAIT = datetime.timedelta(seconds=600)   # a worker with no step re-checks its parent this often


class TPGroup:
    """This rank of a tensor-parallel group, and the collectives over it. world_size 1: no process
    group, every collective returns its input, and the engine is cycle 10's.

    It counts what the model's collectives move and how long this rank waits in them (the
    chapter's tables): the bytes are those of the tensor reduced; the seconds include waiting for a
    slower rank, and on CUDA only the launch (the collective itself runs on the stream)."""

    def __init__(self, rank: int = 0, world_size: int = 1, process_group=None, device: torch.device | None = None):
        self.rank, self.world_size, self.process_group = rank, world_size, process_group
        self.device = device or torch.device("cpu")     # where its tensors must be (NCCL: this rank's GPU)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.all_reduce_bytes = self.all_reduce_calls = 0
        self.all_reduce_s = self.gather_s = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (every rank gets the sum)."""
        if self.world_size == 1:
            return x
        self.all_reduce_bytes += x.numel() * x.element_size()
        self.all_reduce_calls += 1
        start = time.perf_counter()
        self.process_group.allreduce([x]).wait()
        self.all_reduce_s += time.perf_counter() - start
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' x side by side along the last dimension; other ranks: None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else []
        options = dist.GatherOptions()
        options.rootRank = 0
        start = time.perf_counter()
        self.process_group.gather([parts] if self.rank == 0 else [], [x], options).wait()
        self.gather_s += time.perf_counter() - start
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.MAX)

    def min_int(self, value: int) -> int:
        """The smallest value any rank has (the KV pool: every rank must hold the same blocks)."""
        return int(self._reduce(torch.tensor([value], dtype=torch.int64, device=self.device), dist.ReduceOp.MIN).item())

    def _reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.world_size == 1:
            return x
        options = dist.AllreduceOptions()
        options.reduceOp = op
        self.process_group.allreduce([x], options).wait()
        return x

    def stats(self) -> dict:
        return {"tensor_parallel_size": self.world_size, "tp_all_reduce_bytes": self.all_reduce_bytes,
                "tp_all_reduce_calls": self.all_reduce_calls, "tp_all_reduce_s": self.all_reduce_s,
                "tp_gather_s": self.gather_s}


def connect_store(host: str, port: int, world_size: int, host_store: bool):
    """The group's TCPStore and its port: hosted by this process when host_store (port 0: any free
    port), else reached as a client. Its waits time out after COLLECTIVE_TIMEOUT. Our keys live
    under a prefix of their own (torchrun's agent keeps its keys in the same store)."""
    store = dist.TCPStore(host, port, world_size, is_master=host_store, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False)
    return dist.PrefixStore("vllm_learn", store), store.port


def join_group(store, rank: int, world_size: int, device: torch.device) -> TPGroup:
    """The process group over the store: gloo on a CPU, NCCL on CUDA (one GPU per rank)."""
    prefix = dist.PrefixStore("tp", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        return TPGroup(rank, world_size, dist.ProcessGroupNCCL(prefix, rank, world_size, options), device)
    return TPGroup(rank, world_size, dist.ProcessGroupGloo(prefix, rank, world_size, COLLECTIVE_TIMEOUT), device)


class StepChannel:
    """Rank 0 -> every other rank: one pickled message per step, as key n of the store.

    Why the store and not a broadcast: a worker must be waiting before a step comes, and a server
    can stay idle for hours; a collective waiting that long would hit its timeout and break the
    group, while a store wait can time out, check that the parent still lives, and wait again.
    Message n is deleted when n + 1 is sent: by then every rank has run step n's collectives, so
    every rank has read it, and the store never grows. (Measured against a gloo broadcast: chapter 13.)
    """

    def __init__(self, store):
        self.store = dist.PrefixStore("steps", store)
        self.sent = self.received = 0

    def send(self, message) -> None:
        self.store.set(str(self.sent), pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        if self.sent:
            self.store.delete_key(str(self.sent - 1))
        self.sent += 1

    def recv(self, alive=lambda: True):
        """The next message; waits in IDLE_WAIT slices, returning None once alive() is False."""
        key = str(self.received)
        while True:
            try:
                self.store.wait([key], IDLE_WAIT)
                break
            except dist.DistStoreError:
                if not alive():
                    return None
        self.received += 1
        return pickle.loads(self.store.get(key))


def torchrun_env() -> dict | None:
    """Rank, world size, local rank and the store's address when torchrun started this process,
    else None. torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT: every rank is its client."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "host": os.environ["MASTER_ADDR"],
            "port": int(os.environ["MASTER_PORT"])}


def check_launch(tensor_parallel_size: int) -> None:
    """Under torchrun, the world torchrun started must be the engine's: else ranks would wait for
    an engine that never asks them (or the engine for ranks that never come)."""
    env = torchrun_env()
    if env and env["world_size"] != tensor_parallel_size:
        raise ValueError(f"torchrun started {env['world_size']} processes (WORLD_SIZE) but tensor_parallel_size is "
                         f"{tensor_parallel_size}: pass --tensor-parallel-size {env['world_size']}")


def check_divisible(hf_config, tensor_parallel_size: int) -> None:
    """Refuse, before any weight loads, a model whose heads do not split evenly over the ranks."""
    n = tensor_parallel_size     # an integer >= 1: Config checked it
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    problems = [f"{name} ({value})" for name, value in (("num_attention_heads", heads),
                ("num_key_value_heads", kv_heads), ("intermediate_size", hf_config.intermediate_size))
                if value % n]
    if problems:
        sizes = [d for d in range(1, kv_heads + 1) if heads % d == 0 and kv_heads % d == 0
                 and hf_config.intermediate_size % d == 0]
        raise ValueError(f"tensor_parallel_size={n} does not divide {', '.join(problems)}: each rank "
                         f"must hold whole heads; this model runs with tensor_parallel_size in {sizes}")
