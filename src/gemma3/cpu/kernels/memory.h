// Memory placement: drop_file_pages (give back the pages of a tensor read once from the GGUF
// mapping), huge_empty (2 MB pages for the weights a decode step streams) and map_file /
// remap_private (the repack cache's file, mapped on 2 MB pages). Separate: OS calls, no arithmetic.
#pragma once

#include <cerrno>

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

// A range of `nbytes` rounded up to 2 MB pages, plus one page of room, mapped anonymous with `prot`
// (and `flags`), and the first 2 MB boundary in it (`start`): memory there, or a file mapped over
// it, can take 2 MB page-table entries (a file's page-cache folios are 2 MB aligned in the file, so
// its mapping must be too). tensor() hands out `nbytes` from `start`, unmapping the range when freed.
struct AlignedRange {
    void* base;
    size_t len;
    uintptr_t start;

    AlignedRange(int64_t nbytes, int prot, int flags, const char* who) {
        const size_t huge = 2u << 20;
        len = (size_t)(nbytes + huge - 1) / huge * huge + huge;
        base = mmap(nullptr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
        TORCH_CHECK(base != MAP_FAILED, who, ": mmap of ", len, " bytes failed");
        start = ((uintptr_t)base + huge - 1) / huge * huge;
    }

    torch::Tensor tensor(int64_t nbytes) const {
        return torch::from_blob((void*)start, {nbytes}, [base = base, len = len](void*) { munmap(base, len); }, torch::kUInt8);
    }
};

// `nbytes` uninitialised bytes on transparent 2 MB pages where the OS gives them (madvise, best
// effort: plain pages otherwise), for the weights a decode step streams: on 4 KB pages the
// hardware prefetchers stop at every page boundary and the cores miss their TLBs. The 270M
// model's step ran 10.3 -> 9.2 ms with its repacked weights on 2 MB pages (A/B in one process).
torch::Tensor huge_empty(int64_t nbytes) {
    TORCH_CHECK(nbytes >= 0, "huge_empty: negative size");
    const AlignedRange range(nbytes, PROT_READ | PROT_WRITE, 0, "huge_empty");
    madvise((void*)range.start, range.len - (range.start - (uintptr_t)range.base), MADV_HUGEPAGE);
    return range.tensor(nbytes);
}

static void map_at(uintptr_t start, int64_t nbytes, int64_t fd, bool shared) {
    void* at = mmap((void*)start, (size_t)nbytes, PROT_READ | PROT_WRITE, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED,
                    (int)fd, 0);
    TORCH_CHECK(at == (void*)start, "map_file: mmap of ", nbytes, " bytes failed (errno ", errno, ")");
    madvise(at, (size_t)nbytes, MADV_HUGEPAGE);  // best effort: the page cache's 2 MB folios as 2 MB entries
}

// The first `nbytes` of the open file `fd` as uint8, on a 2 MB boundary. `shared`: writes go to the
// file (through the page cache, which writes them back in the background); otherwise private and
// copy-on-write, nothing written reaching the file. The tensor holds the mapping, not the descriptor.
torch::Tensor map_file(int64_t fd, int64_t nbytes, bool shared) {
    TORCH_CHECK(nbytes > 0, "map_file: empty mapping");
    const AlignedRange range(nbytes, PROT_NONE, MAP_NORESERVE, "map_file");  // reserved only: the file goes over it
    try {
        map_at(range.start, nbytes, fd, shared);
    } catch (...) {
        munmap(range.base, range.len);
        throw;
    }
    return range.tensor(nbytes);
}

// Maps the file `fd` again over `t` (a shared map_file of it, filled), private: the same page-cache
// pages at the same addresses, so every view of `t` stays valid, but a stray write to the weights
// no longer reaches the file (as for a later load's mapping).
void remap_private(torch::Tensor t, int64_t fd) {
    TORCH_CHECK(t.dtype() == torch::kUInt8 && t.dim() == 1, "remap_private: a map_file tensor is expected");
    map_at((uintptr_t)t.data_ptr(), t.numel(), fd, false);
}
