// SentencePiece-BPE encoding of one text fragment, the same merges as formats/tokenizer.py's
// `Tokenizer._spm_session` (itself llama.cpp's llm_tokenizer_spm_session), in C++ so that it runs
// without the GIL: a server tokenizing a megabyte prompt on one thread no longer stalls the engine
// thread, which otherwise waits up to Python's switch interval for every op it returns from (a
// 270M decode step went from 11 to 54 ms while one 1 MB prompt was tokenized in Python).
#pragma once
#include "common.h"

#include <algorithm>
#include <queue>

struct SpmVocab {
    // The tables are the Python tokenizer's own (formats/tokenizer.py's _Pieces), read in place:
    // the tensors keep its buffers alive, and the vocabulary is held once in the process.
    torch::Tensor blob_t, offsets_t, scores_t;
    const char* blob = nullptr;      // every piece's UTF-8 bytes, back to back
    const int64_t* offsets = nullptr;  // piece i is blob[offsets[i], offsets[i + 1])
    const double* scores = nullptr;
    int64_t n = 0;                   // pieces
    std::vector<int32_t> table;      // open addressing: piece id or -1, indexed by hash & mask
    uint64_t mask = 0;
    std::vector<int64_t> byte_ids;   // byte-fallback token of each byte value, -1 where none

    SpmVocab(const torch::Tensor& blob_, const torch::Tensor& offsets_, const torch::Tensor& scores_,
             std::vector<int64_t> byte_ids_)
        : blob_t(blob_), offsets_t(offsets_), scores_t(scores_), byte_ids(std::move(byte_ids_)) {
        TORCH_CHECK(blob_.dtype() == torch::kUInt8 && blob_.dim() == 1 && blob_.is_contiguous() &&
                        offsets_.dtype() == torch::kInt64 && offsets_.dim() == 1 && offsets_.is_contiguous() &&
                        scores_.dtype() == torch::kFloat64 && scores_.dim() == 1 && scores_.is_contiguous(),
                    "SpmVocab: blob must be 1-d uint8, offsets 1-d int64, scores 1-d float64");
        n = scores_.numel();
        TORCH_CHECK(offsets_.numel() == n + 1 && byte_ids.size() == 256 && n < (1ll << 31), "SpmVocab: bad table sizes");
        blob = (const char*)blob_.data_ptr<uint8_t>();
        offsets = offsets_.data_ptr<int64_t>();
        scores = scores_.data_ptr<double>();
        TORCH_CHECK(offsets[0] == 0 && offsets[n] == blob_.numel(), "SpmVocab: offsets do not span the blob");
        for (int64_t i = 0; i < n; ++i) TORCH_CHECK(offsets[i] <= offsets[i + 1], "SpmVocab: offsets must not decrease");
        index();
    }

    // From separate strings (TextSet's few special-token texts), into tables of its own.
    explicit SpmVocab(const std::vector<std::string>& pieces) : byte_ids(256, -1) {
        n = (int64_t)pieces.size();
        offsets_t = torch::zeros({n + 1}, torch::kInt64);
        int64_t* off = offsets_t.data_ptr<int64_t>();
        for (int64_t i = 0; i < n; ++i) off[i + 1] = off[i] + (int64_t)pieces[i].size();
        blob_t = torch::empty({off[n]}, torch::kUInt8);
        for (int64_t i = 0; i < n; ++i) std::memcpy(blob_t.data_ptr<uint8_t>() + off[i], pieces[i].data(), pieces[i].size());
        scores_t = torch::zeros({n}, torch::kFloat64);
        blob = (const char*)blob_t.data_ptr<uint8_t>();
        offsets = off;
        scores = scores_t.data_ptr<double>();
        index();
    }

    void index() {
        uint64_t size = 1;
        while (size < 2 * (uint64_t)n) size <<= 1;
        table.assign(size, -1);
        mask = size - 1;
        // In id order, a later duplicate replacing an earlier one: the last id wins, as the
        // Python tokenizer's lookups (llama.cpp's token_to_id).
        for (int32_t id = 0; id < (int32_t)n; ++id) {
            const char* p = blob + offsets[id];
            size_t len = offsets[id + 1] - offsets[id];
            uint64_t h = hash(p, len) & mask;
            while (table[h] >= 0 && !same(table[h], p, len)) h = (h + 1) & mask;
            table[h] = id;
        }
    }

    static uint64_t hash(const char* p, size_t n) {  // FNV-1a
        uint64_t h = 1469598103934665603ull;
        for (size_t i = 0; i < n; ++i) h = (h ^ (uint8_t)p[i]) * 1099511628211ull;
        return h;
    }

    bool same(int32_t id, const char* p, size_t len) const {
        return (size_t)(offsets[id + 1] - offsets[id]) == len && std::memcmp(blob + offsets[id], p, len) == 0;
    }

    int32_t find(const char* p, size_t len) const {
        for (uint64_t h = hash(p, len) & mask; table[h] >= 0; h = (h + 1) & mask)
            if (same(table[h], p, len)) return table[h];
        return -1;
    }

    // The id of a piece's UTF-8 text (the last id of a duplicated one), -1 if none.
    int64_t id_of(const std::string& text) const { return find(text.data(), text.size()); }

    struct Bigram {
        double score;
        int64_t left, right, size;
        // std::priority_queue pops the largest: the highest score, then the leftmost pair (the
        // order of Python's heap of (-score, left, right, size)).
        bool operator<(const Bigram& o) const {
            if (score != o.score) return score < o.score;
            if (left != o.left) return left > o.left;
            if (right != o.right) return right > o.right;
            return size > o.size;
        }
    };

    // Token ids of one fragment (spaces already escaped to U+2581). Symbols start as the UTF-8
    // characters; symbol i spans text[start[i], start[i] + len[i]) and is emptied (len 0) when
    // merged into its left neighbour.
    std::vector<int64_t> encode(const std::string& text) const {
        std::vector<int64_t> start, len, prev, next;
        start.reserve(text.size());
        len.reserve(text.size());
        for (size_t i = 0; i < text.size();) {
            static const uint8_t lengths[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
            size_t n = std::min<size_t>(lengths[(uint8_t)text[i] >> 4], text.size() - i);
            start.push_back((int64_t)i);
            len.push_back((int64_t)n);
            i += n;
        }
        const int64_t n = (int64_t)start.size();
        std::vector<int64_t> ids;
        if (n == 0) return ids;
        prev.resize(n);
        next.resize(n);
        for (int64_t i = 0; i < n; ++i) {
            prev[i] = i - 1;
            next[i] = i + 1 < n ? i + 1 : -1;
        }
        std::vector<Bigram> first;  // the initial pairs, heapified at once (O(n), not n pushes)
        for (int64_t i = 1; i < n; ++i) {
            int32_t id = find(text.data() + start[i - 1], (size_t)(len[i - 1] + len[i]));
            if (id >= 0) first.push_back({scores[id], i - 1, i, len[i - 1] + len[i]});
        }
        std::priority_queue<Bigram> queue(std::less<Bigram>(), std::move(first));
        auto try_add = [&](int64_t left, int64_t right) {
            int64_t size = len[left] + len[right];
            int32_t id = find(text.data() + start[left], (size_t)size);
            if (id >= 0) queue.push({scores[id], left, right, size});
        };
        while (!queue.empty()) {
            Bigram b = queue.top();
            queue.pop();
            // Skip entries made stale by an earlier merge of either symbol.
            if (len[b.left] == 0 || len[b.right] == 0 || len[b.left] + len[b.right] != b.size) continue;
            len[b.left] = b.size;
            len[b.right] = 0;
            int64_t after = next[b.left] = next[b.right];
            if (after >= 0) prev[after] = b.left;
            if (prev[b.left] >= 0) try_add(prev[b.left], b.left);
            if (after >= 0) try_add(b.left, after);
        }
        for (int64_t i = 0; i != -1; i = next[i]) {
            int32_t id = find(text.data() + start[i], (size_t)len[i]);
            if (id >= 0) {
                ids.push_back(id);
                continue;
            }
            for (int64_t k = 0; k < len[i]; ++k) {  // not in the vocabulary: one token per byte
                int64_t byte_id = byte_ids[(uint8_t)text[start[i] + k]];
                TORCH_CHECK(byte_id >= 0, "vocabulary has no byte-fallback token");
                ids.push_back(byte_id);
            }
        }
        return ids;
    }
};

// Which of a set of texts (the special tokens) occur anywhere in a text: the first step of
// tokenizer_st_partition, a scan of every position that Python did one character at a time
// (1.6 s for a 1 MB prompt). A text starts with an ASCII or lead byte, never a continuation
// byte, so trying every byte offset finds exactly the occurrences at character boundaries.
struct TextSet {
    SpmVocab texts;                                     // its hash table, scores unused
    std::vector<std::vector<int64_t>> lengths_by_byte;  // distinct lengths of the texts per first byte

    explicit TextSet(const std::vector<std::string>& items)
        : texts(items), lengths_by_byte(256) {
        for (const auto& t : items) {
            if (t.empty()) continue;
            auto& ls = lengths_by_byte[(uint8_t)t[0]];
            if (std::find(ls.begin(), ls.end(), (int64_t)t.size()) == ls.end()) ls.push_back((int64_t)t.size());
        }
    }

    // Indices (into the constructor's list) of the texts that occur, in ascending order.
    std::vector<int64_t> occurring(const std::string& text) const {
        std::vector<char> seen(texts.n, 0);
        const int64_t n = (int64_t)text.size();
        for (int64_t i = 0; i < n; ++i)
            for (int64_t len : lengths_by_byte[(uint8_t)text[i]]) {
                if (i + len > n) continue;
                int32_t id = texts.find(text.data() + i, (size_t)len);
                if (id >= 0) seen[id] = 1;
            }
        std::vector<int64_t> out;
        for (size_t i = 0; i < seen.size(); ++i)
            if (seen[i]) out.push_back((int64_t)i);
        return out;
    }
};
