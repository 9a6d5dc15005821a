"""wafer: a model of wafer-scale parallelism in the style of the Cerebras Wafer-Scale Engine.

Its modules arrive with chapters 08-13: hardware presets, a cycle-level mesh simulator, placement,
weight streaming and inference.
"""

__version__ = "0.1.0"
