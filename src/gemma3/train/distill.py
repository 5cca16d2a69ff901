"""Distillation with sampled teacher logits: per token, 256 ids sampled from the teacher,
the teacher's probabilities on them as a sparse soft target, and the student's cross-entropy
against it. Targets come from a teacher run on the fly or from a compact precomputed store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import DataError, PackedDataset
from .losses import SparseTarget

TARGET_MODES = ("renorm", "unbiased")
STORE_FORMAT = "gemma3-sparse-targets-v1"


def sample_sparse_targets(logits: torch.Tensor, k: int = 256, temperature: float = 1.0,
                          generator: torch.Generator | None = None, mode: str = "renorm"):
    """The sparse teacher target of each row of `logits` [N, V]: (ids [N, k] long, weights [N, k] fp32).

    Definition:
    1. Draw k ids i.i.d. *with replacement* from the proposal r = softmax(z / τ), τ = `temperature`
       (τ = 1 samples the teacher distribution itself; τ > 1 reaches further into the tail).
    2. Merge duplicates: the sampled set S holds each drawn id once. The k slots keep their shape
       (ids sorted); a repeated slot gets weight 0.
    3. Weight of an id j ∈ S, with p = softmax(z) the teacher distribution:
       - "renorm" (default, the report's method): w_j = p_j / Σ_{i∈S} p_i, the teacher
         probabilities "renormalised over the sampled set": a proper distribution per draw, but
         biased towards the head (a tail id's expected weight is π_j·p_j / p(S) < p_j); exact when
         S covers every id with mass.
       - "unbiased": w_j = p_j / π_j, the Horvitz–Thompson estimator, where
         π_j = P(j ∈ S) = 1 − (1 − r_j)^k is j's inclusion probability. Then E[w_j·1{j∈S}] = p_j for
         every id, so the sparse target is an unbiased estimate of the teacher distribution and
         −Σ_{j∈S} w_j log s_j an unbiased estimate of the dense distillation loss H(p, s) and of its
         gradient, for any τ. The weights sum to 1 in expectation, not per draw; head ids that are
         all but certain to be drawn (π ≈ 1) get w ≈ p exactly, with no sampling noise.
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown target mode {mode!r}; choose one of {', '.join(TARGET_MODES)}")
    z = logits.float()
    peak = z.amax(-1, keepdim=True)
    # Unnormalised proposal weights exp((z − max)/τ): multinomial normalises by itself, and only the
    # k sampled entries need normalised probabilities (a vocabulary-wide softmax costs 3 passes).
    weights_r = (z - peak).div_(temperature).exp_() if temperature != 1.0 else (z - peak).exp_()
    log_zr = weights_r.sum(-1, keepdim=True).log()
    ids = torch.multinomial(weights_r, k, replacement=True, generator=generator).sort(dim=-1).values
    del weights_r
    log_z = log_zr if temperature == 1.0 else torch.logsumexp(z - peak, dim=-1, keepdim=True)
    z_ids = z.gather(1, ids) - peak
    p = (z_ids - log_z).exp()
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    if mode == "unbiased":
        r = (z_ids / temperature - log_zr).exp()
        inclusion = -torch.expm1(k * torch.log1p(-r))
        weights = p / inclusion * first
    else:
        weights = p * first
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


def sequence_generator(seed: int, key: int, device=None) -> torch.Generator:
    """A generator per (seed, sequence key): targets do not depend on batch size or rank count
    (on one device type: CUDA draws other numbers than the CPU from the same seed)."""
    gen = torch.Generator(device=device or "cpu")
    return gen.manual_seed(int(np.random.SeedSequence([seed, key]).generate_state(1)[0]))


def sample_from_hidden(hidden: torch.Tensor, head: torch.Tensor, mask: torch.Tensor, k: int, temperature: float,
                       mode: str, generator: torch.Generator, chunk: int = 128):
    """Sparse targets for one sequence from the teacher's final hidden states [L, D]; rows that are
    not targets get weight 0."""
    ids, weights = [], []
    for s in range(0, hidden.shape[0], chunk):
        i, w = sample_sparse_targets(hidden[s:s + chunk] @ head.T, k, temperature, generator, mode)
        ids.append(i)
        weights.append(w * mask[s:s + chunk, None].to(w.device))
    return torch.cat(ids), torch.cat(weights)


class TeacherTargets:
    """On-the-fly targets: the teacher runs on each micro-batch (inference mode) and is sampled.
    Each sequence is sampled with the generator of its position in the global order."""

    def __init__(self, teacher, k: int = 256, temperature: float = 1.0, mode: str = "renorm", seed: int = 0):
        self.teacher, self.k, self.temperature, self.mode, self.seed = teacher, k, temperature, mode, seed

    def __call__(self, batch) -> SparseTarget:
        with torch.inference_mode():
            hidden = self.teacher.hidden_states(batch.inputs.to(self.teacher.device))
            head = self.teacher.embed_tokens.weight
            ids, weights = zip(*(sample_from_hidden(h, head, m, self.k, self.temperature, self.mode,
                                                    sequence_generator(self.seed, int(pos), hidden.device))
                                 for h, m, pos in zip(hidden, batch.mask, batch.positions)))
        return SparseTarget(torch.cat(ids).clone(), torch.cat(weights).clone())


class TargetStore:
    """Precomputed sparse targets on disk, read by memory map (streamed, never loaded whole).

    A directory with meta.json and three flat arrays in CSR layout over the packed stream's target
    rows (sequence i, position t → row i·L + t): `offsets.i64` [rows + 1], and for row r the entries
    offsets[r]:offsets[r+1] of `ids.i32` (int32 token ids) and `probs.f16` (fp16 weights). Only the
    distinct sampled ids are stored (k = 256 draws of a peaked distribution hit far fewer ids), and
    rows that are not targets store nothing. `gemma3 distill precompute` also writes the teacher's
    tokenizer.model there, so training from the store tokenizes the data as the teacher saw it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.path}: not a target store (no meta.json; was precompute interrupted?)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != STORE_FORMAT:
            raise DataError(f"{self.path}: unknown target store format {self.meta.get('format')!r}")
        self.offsets = np.memmap(self.path / "offsets.i64", dtype=np.int64, mode="r")
        self.ids = np.memmap(self.path / "ids.i32", dtype=np.int32, mode="r")
        self.probs = np.memmap(self.path / "probs.f16", dtype=np.float16, mode="r")
        if len(self.offsets) != self.meta["sequences"] * self.meta["seq_len"] + 1 or \
                self.offsets[-1] != len(self.ids) or len(self.ids) != len(self.probs):
            raise DataError(f"{self.path}: arrays do not match meta.json (truncated store?)")

    def check(self, data: PackedDataset):
        if data.seq_len != self.meta["seq_len"] or data.fingerprint != self.meta["data_fingerprint"]:
            raise DataError(f"{self.path}: targets were computed for other data or another --seq-len "
                            f"(store: seq_len {self.meta['seq_len']}, data {self.meta['data_fingerprint']}; "
                            f"now: seq_len {data.seq_len}, data {data.fingerprint})")

    def __call__(self, batch) -> SparseTarget:
        L = self.meta["seq_len"]
        counts, ids, probs = [], [], []
        for i in np.asarray(batch.indices):
            offs = np.asarray(self.offsets[i * L:(i + 1) * L + 1])
            counts.append(np.diff(offs))
            ids.append(np.asarray(self.ids[offs[0]:offs[-1]]))
            probs.append(np.asarray(self.probs[offs[0]:offs[-1]]))
        counts = np.concatenate(counts)
        width = max(1, int(counts.max()))
        rows = np.repeat(np.arange(len(counts)), counts)
        cols = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        out_ids = torch.zeros(len(counts), width, dtype=torch.long)
        out_w = torch.zeros(len(counts), width, dtype=torch.float32)
        out_ids[rows, cols] = torch.from_numpy(np.concatenate(ids).astype(np.int64))
        out_w[rows, cols] = torch.from_numpy(np.concatenate(probs).astype(np.float32))
        return SparseTarget(out_ids, out_w)


def precompute(teacher, data: PackedDataset, out: str | Path, k: int = 256, temperature: float = 1.0,
               mode: str = "renorm", seed: int = 0, batch_size: int = 4, teacher_name: str = "",
               progress: bool = True) -> dict:
    """Runs the teacher over every packed sequence once and writes a `TargetStore` to `out`.
    Sequence i is sampled with sequence_generator(seed, i). meta.json is written last, so an
    interrupted run leaves no loadable store."""
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown target mode {mode!r}; choose one of {', '.join(TARGET_MODES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    L, start = data.seq_len, time.perf_counter()
    offsets = np.zeros(data.n * L + 1, dtype=np.int64)
    head = teacher.embed_tokens.weight
    with open(out / "ids.i32", "wb") as f_ids, open(out / "probs.f16", "wb") as f_probs:
        for b in tqdm(range(0, data.n, batch_size), desc="teacher targets", unit="batch", disable=not progress):
            indices = np.arange(b, min(b + batch_size, data.n))
            inputs, _, mask = data.sequences(indices)
            with torch.inference_mode():
                hidden = teacher.hidden_states(inputs.to(teacher.device))
                for i, h, m in zip(indices, hidden, mask):
                    ids, w = sample_from_hidden(h, head, m, k, temperature, mode,
                                                sequence_generator(seed, int(i), h.device))
                    w16 = w.to(torch.float16)
                    keep = w16 > 0
                    f_ids.write(ids[keep].to(torch.int32).cpu().numpy().tobytes())
                    f_probs.write(w16[keep].cpu().numpy().tobytes())
                    offsets[i * L + 1:(i + 1) * L + 1] = keep.sum(-1).cpu().numpy()
    np.cumsum(offsets, out=offsets)
    offsets.tofile(out / "offsets.i64")
    entries = int(offsets[-1])
    meta = {"format": STORE_FORMAT, "k": k, "temperature": temperature, "mode": mode, "seed": seed,
            "seq_len": L, "sequences": data.n, "data_fingerprint": data.fingerprint, "teacher": teacher_name,
            "target_tokens": int(data.target_count(np.arange(data.n))), "entries": entries,
            "ids_per_target_token": entries / max(1, data.target_count(np.arange(data.n))),
            "bytes": entries * 6 + offsets.nbytes, "seconds": round(time.perf_counter() - start, 2)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
