"""Tensor parallelism inside one engine: N ranks, rank 0 in the engine's own process
(scheduler, sampler, and in a worker the gRPC server and transfer backend) and ranks
1..N-1 as child processes that run each step rank 0 broadcasts.

`layout` (torch-free) says which heads, rows and vocabulary each rank holds; `comm`
holds the process groups; `step` the wire format of a step; `model` the sharded
decoder and its weight loading; `runner` both ends of a step; `launch` rank 0's
management of the others; `follower` their process. Nothing here runs when
tensor_parallel_size is 1.
"""
