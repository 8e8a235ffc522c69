"""Triton kernels, installed as vtprune.triton_kernels; module <op>.py defines function <op>."""
