"""Triton kernels of dppa_kernels, installed as ``dppa_kernels.kernels``.

Importing this package never imports triton; each kernel module does so itself, so that the
package works on machines without triton.
"""
