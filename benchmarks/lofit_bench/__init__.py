"""The LoFiT benchmark: ``python -m benchmarks.lofit_bench {grid,latency,train-speed,eval-speed,combine}``.

- ``methods``: the compared methods as data (what they train, where their heads come from, their learning rate)
- ``measure``: peak memory, activations kept for backward, epoch times, latency, adapter size
- ``grid``: every method x seed (and sweeps) trained and evaluated the same way
- ``speed``: training speed, inference latency and evaluation-cache speed, round-robin
- ``report``: summaries over seeds, the Markdown table, the plots, combining runs
"""
