"""torch_vjp's benchmark suite: `python -m benchmarks` (see benchmarks/README.md).

Time, peak memory and % of speed-of-light of every op's forward and backward against eager torch,
torch.compile and Liger-Kernel, and the VJP against materialised Jacobians.
"""
