"""Page-locking the experts' host copy through the driver: the flags a kernel needs to read it in place,
refusals that leave nothing behind, and no registration outliving its store."""

import gc

import torch

from localmoe.runtime.pinning import DEVICEMAP, PORTABLE, Driver, Pinned


class FakeDriver:
    """Records registrations; refuses the sizes in `refuse`."""

    def __init__(self, refuse: tuple[int, ...] = ()):
        self.refuse, self.registered, self.calls = refuse, {}, []

    def register(self, pointer: int, nbytes: int) -> int:
        self.calls.append((pointer, nbytes))
        if nbytes in self.refuse:
            return 2  # CUDA_ERROR_OUT_OF_MEMORY
        self.registered[pointer] = nbytes
        return 0

    def unregister(self, pointer: int) -> int:
        del self.registered[pointer]
        return 0

    def error(self, code: int) -> str:
        return "CUDA_ERROR_OUT_OF_MEMORY"


def test_registered_for_the_device_to_map_and_unregistered_on_close():
    driver, tensors = FakeDriver(refuse=(40,)), [torch.zeros(4), torch.zeros(10), torch.zeros(8)]
    pins = Pinned(driver)
    assert [pins.add(t) for t in tensors] == [True, False, True]
    assert pins.refused == "CUDA_ERROR_OUT_OF_MEMORY"
    assert driver.registered == {tensors[0].data_ptr(): 16, tensors[2].data_ptr(): 32}
    pins.close()
    assert driver.registered == {}
    pins.close()  # once only


def test_pins_go_when_their_owner_is_collected():
    driver = FakeDriver()
    pins = Pinned(driver)
    pins.add(torch.zeros(4))
    del pins
    gc.collect()
    assert driver.registered == {}


class FakeLibcuda:
    def __init__(self):
        self.calls = []

    def cuMemHostRegister_v2(self, pointer, nbytes, flags):  # noqa: N802 (the driver's name)
        self.calls.append((pointer.value, nbytes.value, flags))
        return 0


def test_the_driver_is_asked_for_memory_a_kernel_can_read_in_place():
    driver, lib = Driver(), FakeLibcuda()
    driver._lib = lib
    tensor = torch.zeros(4)
    assert driver.register(tensor.data_ptr(), 16) == 0
    assert lib.calls == [(tensor.data_ptr(), 16, PORTABLE | DEVICEMAP)]


def test_the_store_pins_every_layer_and_unpins_on_close(tiny_mixtral):
    from localmoe.loader import model_skeleton, open_checkpoint
    from localmoe.runtime.expert_store import ExpertStore

    checkpoint, family = open_checkpoint(str(tiny_mixtral))
    parts = model_skeleton(checkpoint, family, torch.float32)
    driver = FakeDriver()
    store = ExpertStore(parts.experts, torch.float32, "ram", torch.device("cpu"), driver=driver)
    assert store.pinned == set(parts.experts.blocks) and len(driver.registered) == len(store.rows)
    store.close()
    assert driver.registered == {}
