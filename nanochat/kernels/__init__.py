"""Hand-written autograd kernels for the model's elementwise work.

`cpu` holds the row-blocked kernels `nanochat.gpt` runs in eager mode (written for
CPUs, correct on any device). Each kernel equals a plain PyTorch formula, named in its
docstring as its reference; under torch.compile the model uses those formulas instead
and the compiler fuses them.
"""
