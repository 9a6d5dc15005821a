"""What the tensor-parallel tests run in several processes (``spawn`` imports it by name): both
layouts in one group of processes, since starting one costs seconds."""

from minigpt.parallel.tensor import tensor_parallel_step


def both_ways(rank, world, *args):
    return {way: tensor_parallel_step(rank, world, *args, way=way, dtype="float64")
            for way in ("megatron", "dtensor")}
