"""wafer: a model of wafer-scale parallelism in the style of the Cerebras Wafer-Scale Engine.

- ``hardware``: wafers, GPUs and clusters, with every constant's unit and source (chapter 08);
- ``workload``: a GPT as ops with FLOPs, weights and activations per token (chapter 08);
- ``cost``: the analytic model: transfers, collectives, roofline, bounds (chapters 08-09);
- ``mesh``: a cycle-level simulator of the PE mesh (chapter 09);
- ``collectives``: broadcast, reduce, allreduce, GEMV and GEMM as mesh programs (chapter 09).

- ``placement``: layers on rectangles of PEs, four strategies and their evaluation (chapter 10, in
  progress: the optimizer, the simulator check and the explorer are to come).

Weight streaming, inference and emulation arrive with chapters 11-13.
"""

__version__ = "0.1.0"
