// Memory placement: drop_file_pages (give back the pages of a tensor read once from the GGUF
// mapping) and huge_empty (2 MB pages for the weights a decode step streams). Separate: OS calls,
// no arithmetic.
#pragma once

#include "common.h"

// Lets go of the pages of `t` in this process (MADV_DONTNEED on the whole pages inside it), for a
// tensor read once from a private, unmodified file mapping (the GGUF's) and not needed again:
// resident memory drops by its size, and the page cache keeps the file. Never for other memory:
// anonymous pages would read back as zeros.
void drop_file_pages(torch::Tensor t) {
    const uintptr_t page = 4096, begin = (uintptr_t)t.data_ptr(), end = begin + t.numel() * t.element_size();
    const uintptr_t a = (begin + page - 1) / page * page, b = end / page * page;
    if (b > a) TORCH_CHECK(madvise((void*)a, b - a, MADV_DONTNEED) == 0, "drop_file_pages: madvise failed");
}

// `nbytes` uninitialised bytes on transparent 2 MB pages where the OS gives them (madvise, best
// effort: plain pages otherwise), for the weights a decode step streams: on 4 KB pages the
// hardware prefetchers stop at every page boundary and the cores miss their TLBs. The 270M
// model's step ran 10.3 -> 9.2 ms with its repacked weights on 2 MB pages (A/B in one process).
torch::Tensor huge_empty(int64_t nbytes) {
    TORCH_CHECK(nbytes >= 0, "huge_empty: negative size");
    const size_t huge = 2u << 20, len = (size_t)(nbytes + huge - 1) / huge * huge + huge;  // + room to align
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "huge_empty: mmap of ", len, " bytes failed");
    const uintptr_t start = ((uintptr_t)base + huge - 1) / huge * huge;
    madvise((void*)start, len - (start - (uintptr_t)base), MADV_HUGEPAGE);
    return torch::from_blob((void*)start, {nbytes}, [base, len](void*) { munmap(base, len); }, torch::kUInt8);
}
