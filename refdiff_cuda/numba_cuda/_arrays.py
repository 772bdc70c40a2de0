"""Where the numba-cuda backend's arrays live, and how kernels are launched.

Two containers, chosen once when the backend is built:

  "host"  (no CuPy, or the CUDA simulator): the backend's arrays are NumPy arrays (xp =
          numpy). Each op copies its inputs to the device (cuda.to_device), runs its kernels
          and copies its outputs back; caches keep device arrays, so a backward re-uploads
          only dy. This is version 1's transfer design: correct everywhere, and the only one
          numba offers without a device array type that has arithmetic (the models add and
          cast arrays between ops, which DeviceNDArray cannot do).
  "cupy"  (CuPy importable and a real GPU): the arrays are CuPy arrays (xp = cupy); kernels
          receive them through __cuda_array_interface__ (cuda.as_cuda_array: no copy), so
          activations never leave the device.
"""
from __future__ import annotations

import numpy as np
from numba import config

# Threads per block of 1-D launches. The simulator runs every thread of a block as a Python
# thread, idle ones included, so there blocks are small.
TPB = 16 if config.ENABLE_CUDASIM else 128


class Arrays:
    def __init__(self, cuda, mode):
        self.cuda, self.mode = cuda, mode
        if mode == "cupy":
            import cupy
            self.cp = cupy
            self.xp = cupy
        else:
            self.xp = np

    # -- conversions -------------------------------------------------------------------------
    @staticmethod
    def is_device(a):
        """A numba device array (DeviceNDArray, or the simulator's FakeCUDAArray)."""
        return hasattr(a, "copy_to_host") and not isinstance(a, np.ndarray)

    def is_on_device(self, a):
        """A device array of this container: a numba device array, or in "cupy" mode any
        array exposing __cuda_array_interface__ (CuPy's)."""
        return self.is_device(a) or (self.mode == "cupy" and hasattr(a, "__cuda_array_interface__"))

    def dev(self, a, dtype=None):
        """Any array (host, CuPy or device) -> a C-contiguous device array (no copy when it
        already is one of the right dtype)."""
        if self.is_device(a):
            if (dtype is None or np.dtype(a.dtype) == np.dtype(dtype)) and a.is_c_contiguous():
                return a
            a = a.copy_to_host()
        if self.mode == "cupy" and not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__"):
            c = self.cp.ascontiguousarray(self.cp.asarray(a) if dtype is None else self.cp.asarray(a).astype(dtype))
            return self.cuda.as_cuda_array(c)
        h = np.ascontiguousarray(np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype))
        return self.cuda.to_device(h)

    def empty(self, shape, dtype):
        """A new device array (CuPy-backed in "cupy" mode)."""
        if self.mode == "cupy":
            return self.cuda.as_cuda_array(self.cp.empty(shape, dtype=dtype))
        return self.cuda.device_array(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        if self.mode == "cupy":
            return self.cuda.as_cuda_array(self.cp.zeros(shape, dtype=dtype))
        return self.cuda.to_device(np.zeros(shape, dtype=dtype))

    def out(self, d):
        """Device array -> what the backend returns (NumPy or CuPy)."""
        if self.mode == "cupy":
            return self.cp.asarray(d)
        return d.copy_to_host()

    def asarray(self, a, dtype=None):
        if self.mode == "cupy":
            return self.cp.asarray(a, dtype=dtype)
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        if self.mode == "cupy" and isinstance(a, self.cp.ndarray):
            return self.cp.asnumpy(a)
        if self.is_device(a):
            return a.copy_to_host()
        return np.asarray(a)


def grid(n, tpb=TPB):
    return (max(1, (n + tpb - 1) // tpb),), (tpb,)
