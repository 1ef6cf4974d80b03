"""Triton kernels for wsm_optim, installed as ``wsm_optim.kernels``."""
