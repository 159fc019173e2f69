"""Page-locking host memory in place, through the CUDA driver (`cuMemHostRegister`), for as long as its
owner lives.

Registered with the portable and device-map flags: copies from it are asynchronous, and a kernel can
read it over the bus where it lies, through unified virtual addressing (the direct miss policy). A
refusal leaves nothing behind: the driver API, unlike torch's cudart binding, keeps no sticky error for
the next kernel launch to raise. Unregistered on `close`, or when the owner is collected, so that a
second `load` in one process does not leak pinned memory.
"""

import ctypes
import weakref

import torch

PORTABLE, DEVICEMAP = 0x01, 0x02  # CU_MEMHOSTREGISTER_*


class Driver:
    """The three driver calls we need, from libcuda (loaded on first use)."""

    def __init__(self):
        self._lib = None

    def register(self, pointer: int, nbytes: int) -> int:
        """A CUresult: 0 when the memory is now page-locked and mapped for every device."""
        lib = self._library()
        return lib.cuMemHostRegister_v2(ctypes.c_void_p(pointer), ctypes.c_size_t(nbytes), PORTABLE | DEVICEMAP)

    def unregister(self, pointer: int) -> int:
        return self._library().cuMemHostUnregister(ctypes.c_void_p(pointer))

    def error(self, code: int) -> str:
        name = ctypes.c_char_p()
        self._library().cuGetErrorName(code, ctypes.byref(name))
        return name.value.decode() if name.value else f"CUresult {code}"

    def _library(self):
        if self._lib is None:
            self._lib = ctypes.CDLL("libcuda.so.1")
            self._lib.cuMemHostRegister_v2.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
            self._lib.cuMemHostUnregister.argtypes = (ctypes.c_void_p,)
        return self._lib


class Pinned:
    """Host tensors page-locked in place, until `close` or until this object is collected."""

    def __init__(self, driver: Driver | None = None):
        self.driver = driver or Driver()
        self.refused: str | None = None  # why the first refusal happened, for the load summary
        self._tensors: list[torch.Tensor] = []  # kept alive while registered
        self._finalizer = weakref.finalize(self, _unregister, self.driver, self._tensors)
        self._finalizer.atexit = False  # at exit the process's memory goes anyway, the driver maybe first

    def add(self, tensor: torch.Tensor) -> bool:
        """Page-lock `tensor`'s memory (page-aligned, contiguous); False, and nothing left behind, where the
        driver refuses (or cannot be loaded)."""
        try:
            code = self.driver.register(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        except OSError as error:  # no driver library: nothing to register with
            self.refused = self.refused or str(error)
            return False
        if code != 0:
            self.refused = self.refused or self.driver.error(code)
            return False
        self._tensors.append(tensor)
        return True

    def close(self) -> None:
        self._finalizer()


def _unregister(driver: Driver, tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        driver.unregister(tensor.data_ptr())
    tensors.clear()
