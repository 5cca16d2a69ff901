"""Reward models (a Gemma 3 backbone + a scalar head, Bradley–Terry on preference pairs) and WARM
(Ramé et al., 2024: weight-averaged reward models).

The reward of a sequence is a linear head on the final-norm hidden state of its last token. Only
the top `trainable_layers` decoder layers, the final norm and the head are trained; the layers
below stay frozen, so their output (the *trunk features*) is computed once per pair and shared by
every reward model of a WARM ensemble, which all start from one initialisation (the same backbone
and the same head init) and differ only in seed, data order and learning rate. Averaging the
trained tensors gives one reward model at the inference cost of one.

Pairs are JSONL lines {"prompt", "chosen", "rejected"}; the loss is −log σ(r(prompt+chosen) −
r(prompt+rejected)). A saved reward model is a directory: rm_config.json (base model, trainable
layers) and rm.safetensors (the trained tensors under the backbone's names, plus `head.*`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model.decoder import KVRows


@dataclass(frozen=True)
class RMConfig:
    trainable_layers: int = 1
    lr: float = 1e-4
    epochs: int = 2
    batch: int = 8
    seed: int = 0
    base: str | None = None  # the backbone it was trained on (a model path, or None: the embedded 270M)
    bootstrap: bool = False  # train on a resample of the pairs with replacement (bagging), drawn from `seed`


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, trainable_layers: int = 1, head_seed: int = 0):
        super().__init__()
        n = len(backbone.layers)
        if not 0 <= trainable_layers <= n:
            raise ValueError(f"trainable_layers must be in 0..{n}, got {trainable_layers}")
        self.backbone, self.split = backbone, n - trainable_layers
        for p in backbone.parameters():
            p.requires_grad_(False)
        # No bias: Bradley–Terry sees only reward differences, so a bias would never train.
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        with torch.no_grad():  # the shared initialisation of a WARM ensemble: a fixed, small head
            g = torch.Generator().manual_seed(head_seed)
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.01)
        for p in self.trained_parameters().values():
            p.requires_grad_(True)

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The tensors training changes (and WARM averages), by name."""
        keep = [f"backbone.layers.{i}." for i in range(self.split, len(self.backbone.layers))]
        keep += ["backbone.norm.", "head."] if self.split < len(self.backbone.layers) else ["head."]
        return {n: p for n, p in self.named_parameters() if n.startswith(tuple(keep))}

    def _rope(self, length: int):
        positions = torch.arange(length)
        return positions, self.backbone.rope(positions)

    @torch.no_grad()
    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The frozen trunk's output [B, L, D] for right-padded `ids` [B, L] (causal: padding after
        a sequence does not change its positions)."""
        m = self.backbone
        positions, rope = self._rope(ids.shape[1])
        x, whole = m.embed(ids), [KVRows(slice(None), None, positions)]
        for layer in m.layers[:self.split]:
            x = layer(x, *rope[layer.is_global], whole, None)
        return x

    def score_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards [B] from trunk features: the trained layers, the final norm, the head at the
        last token."""
        m = self.backbone
        positions, rope = self._rope(x.shape[1])
        whole = [KVRows(slice(None), None, positions)]
        for layer in m.layers[self.split:]:
            x = layer(x, *rope[layer.is_global], whole, None)
        last = m.norm(x[torch.arange(x.shape[0]), lengths - 1])
        return self.head(last.float())[:, 0]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.score_features(self.features(ids), lengths)


def read_pairs(path: str | Path) -> list[dict]:
    """Preference pairs from JSONL; each line needs string fields prompt, chosen and rejected."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: a preference pair needs string fields prompt, chosen, rejected "
                             f"(missing or not a string: {', '.join(missing)})")
        pairs.append(row)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


def encode_pairs(tokenizer, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [2N, L] (right-padded: chosen rows 0..N−1, then rejected) and their lengths [2N]."""
    texts = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    rows = [tokenizer.encode(t, add_bos=True) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


class PairFeatures:
    """Trunk features of encoded pairs, computed once (in chunks) and reused by every model that
    shares the trunk."""

    def __init__(self, rm: RewardModel, ids: torch.Tensor, lengths: torch.Tensor, chunk: int = 32):
        self.n = ids.shape[0] // 2
        self.x = torch.cat([rm.features(ids[s:s + chunk]) for s in range(0, ids.shape[0], chunk)])
        self.lengths = lengths

    def batch(self, index: torch.Tensor):
        rows = torch.cat([index, index + self.n])
        return self.x[rows], self.lengths[rows]


def training_rows(n: int, cfg: RMConfig, order: random.Random | None = None) -> list[int]:
    """The pair indices one epoch of `cfg` goes through (in some order): all n, or with
    cfg.bootstrap n drawn with replacement (about 63% of the pairs, some twice)."""
    order = order or random.Random(cfg.seed)
    return [order.randrange(n) for _ in range(n)] if cfg.bootstrap else list(range(n))


def train_rm(rm: RewardModel, feats: PairFeatures, cfg: RMConfig, flipped: torch.Tensor | None = None,
             progress=None) -> list[float]:
    """Bradley–Terry training of `rm`'s trained tensors on the pairs behind `feats` (`flipped`: a
    bool [N] of pairs whose labels are swapped: chosen and rejected exchanged). Returns the loss of
    each step."""
    torch.manual_seed(cfg.seed)
    order = random.Random(cfg.seed)
    rows = training_rows(feats.n, cfg, order)
    params = list(rm.trained_parameters().values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    swap = flipped if flipped is not None else torch.zeros(feats.n, dtype=torch.bool)
    losses = []
    rm.train()
    for _ in range(cfg.epochs):
        idx = list(rows)
        order.shuffle(idx)
        for s in range(0, len(idx), cfg.batch):
            index = torch.tensor(idx[s:s + cfg.batch])
            index = torch.where(swap[index], index + feats.n, index)  # flipped: the rejected row first
            loss = _bt_rows(rm, feats, index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress:
                progress(1)
    rm.eval()
    return losses


def _bt_rows(rm, feats: PairFeatures, first: torch.Tensor) -> torch.Tensor:
    """−log σ(r(first) − r(other)) where `first` holds row indices (chosen rows < N, rejected ≥ N)
    and `other` is the pair's other row."""
    other = torch.where(first < feats.n, first + feats.n, first - feats.n)
    rows = torch.cat([first, other])
    r = rm.score_features(feats.x[rows], feats.lengths[rows])
    return -F.logsigmoid(r[:len(first)] - r[len(first):]).mean()


@torch.no_grad()
def accuracy(rm: RewardModel, feats: PairFeatures, chunk: int = 64) -> float:
    """Share of pairs whose chosen completion gets the higher reward."""
    rm.eval()
    right = 0
    for s in range(0, feats.n, chunk):
        index = torch.arange(s, min(s + chunk, feats.n))
        x, lengths = feats.batch(index)
        r = rm.score_features(x, lengths)
        right += int((r[:len(index)] > r[len(index):]).sum())
    return right / feats.n


def trained_state(rm: RewardModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rm.trained_parameters().items()}


def load_trained_state(rm: RewardModel, state: dict[str, torch.Tensor]) -> RewardModel:
    want = rm.trained_parameters()
    if set(state) != set(want):
        odd = sorted(set(state) ^ set(want))[0]
        raise ValueError(f"reward model tensors do not match the model: {odd} "
                         f"{'is unexpected' if odd in state else 'is missing'}")
    with torch.no_grad():
        for k, p in want.items():
            if p.shape != state[k].shape:
                raise ValueError(f"reward model tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[k])
    return rm


def warm_average(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """WARM: the (weighted) mean of reward models' trained tensors (same initialisation, same keys)."""
    if not states:
        raise ValueError("WARM needs at least one reward model")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 2):
        if set(s) != keys:
            raise ValueError(f"reward model {i} has other tensors than the first: not one shared initialisation")
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    if len(w) != len(states) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("WARM weights: one non-negative weight per model, not all zero")
    w = w / w.sum()
    return {k: sum(float(wi) * s[k].double() for wi, s in zip(w, states)).to(states[0][k].dtype) for k in keys}


def train_warm(rm: RewardModel, feats: PairFeatures, cfg: RMConfig, models: int, lr_spread: float = 2.0,
               flipped: torch.Tensor | None = None):
    """WARM: `models` reward models fine-tuned from `rm`'s current tensors (the shared
    initialisation), member i with its own data order (seed cfg.seed + 1 + i; with cfg.bootstrap
    also its own resample of the pairs) and learning rate (geometrically spread over
    [lr/lr_spread, lr·lr_spread]). Returns ([(config, tensors)] per
    member, the averaged tensors); `rm` is left holding the last member."""
    init = trained_state(rm)
    members = []
    for i in range(models):
        exponent = 2 * i / (models - 1) - 1 if models > 1 else 0.0
        member_cfg = replace(cfg, seed=cfg.seed + 1 + i, lr=cfg.lr * lr_spread ** exponent)
        load_trained_state(rm, init)
        train_rm(rm, feats, member_cfg, flipped)
        members.append((member_cfg, trained_state(rm)))
    return members, warm_average([s for _, s in members])


def save_rm(path: str | Path, rm: RewardModel, cfg: RMConfig, extra: dict | None = None):
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained_state(rm).items()}, str(path / "rm.safetensors"))
    (path / "rm_config.json").write_text(json.dumps({**asdict(cfg), **(extra or {})}, indent=2))


def read_rm(path: str | Path) -> tuple[RMConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "rm_config.json").exists() or not (path / "rm.safetensors").exists():
        raise ValueError(f"{path}: not a reward model directory (rm_config.json + rm.safetensors)")
    raw = json.loads((path / "rm_config.json").read_text())
    cfg = RMConfig(**{k: raw[k] for k in RMConfig.__dataclass_fields__ if k in raw})
    return cfg, load_file(str(path / "rm.safetensors"))
