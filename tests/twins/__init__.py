"""Plain-NumPy twins of the kernels: written to be obviously right, never fast.

The twin is the specification; the kernel is the speed. Tests compare the two.
"""
