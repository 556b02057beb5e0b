"""memplan's counting CPU allocator (csrc/shim.cpp built as a shared library, loaded with ctypes)
for the PyTorch reference scripts beside this file."""
import ctypes


def install_counter(lib):
    """Installs the counting allocator of `lib`, counts from here on in channel 2 (uncounted as
    device bytes), and returns counter(): (current, peak) bytes of channel 0, the device's."""
    err = ctypes.c_char_p()
    assert lib.mp_install_counting_allocator(ctypes.byref(err)) == 0
    lib.mp_set_channel(2)

    def counter():
        c, p = ctypes.c_int64(), ctypes.c_int64()
        lib.mp_counter(0, ctypes.byref(c), ctypes.byref(p))
        return c.value, p.value

    return counter
