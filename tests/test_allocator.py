"""`recsys` keeps freed memory in the process (`commands.allocator`): a micro-batch's few
large tensors, freed, come back without faulting in fresh pages. Without it glibc trims
them off the heap after every batch (three 4 MB blocks: ~3,000 page faults per batch)."""

import ctypes
import platform
import resource

import pytest

from commands.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_batchs_freed_blocks_come_back_without_new_pages():
    assert keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 4 << 20  # 1,024 pages: a (256, 4096) float32 score matrix

    def faults_for_one_batch() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(size) for _ in range(3)]  # scores, their filtered copy, a mask
        for block in blocks:
            ctypes.memset(block, 1, size)  # every page written
        for block in blocks:
            libc.free(ctypes.c_void_p(block))
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_for_one_batch()  # the first grows the heap
    assert max(faults_for_one_batch() for _ in range(5)) < 100
