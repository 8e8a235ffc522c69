"""Reference (PyTorch) implementation of every op: the executable spec and the CPU path."""
