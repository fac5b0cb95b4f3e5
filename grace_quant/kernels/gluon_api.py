"""Gluon names that moved between Triton releases, resolved once for the Gluon kernels (:mod:`.gluon_w4a16`,
:mod:`.gluon_gemv`): the GPU machine runs Triton 3.6, a fresh ``pip install torch`` brings 3.7-3.9. Each alias is the
builtin itself, so jitted code may call it like the original."""

from __future__ import annotations

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

__all__ = ["cta_barrier", "tma_load"]

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
"""TMA global -> shared copy: ``async_load`` from Triton 3.7 on (where the old name raises), the old name before."""
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
"""A barrier of the CTA's threads: ``barrier`` from Triton 3.7 on, ``thread_barrier`` before."""
