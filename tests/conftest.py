import pytest
import torch

from gemma3.model.config import Gemma3Config, layer_pattern
from gemma3.model.decoder import Gemma3


def tiny_config(layers=7, local_per_global=5, heads=4, kv_heads=2, head_dim=16, hidden=64, window=8,
                qscalar=None, rope_scale=1.0, vocab=257, ctx=4096) -> Gemma3Config:
    return Gemma3Config(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=2 * hidden, sliding_window=window, max_context=ctx,
        layer_types=layer_pattern(layers, local_per_global),
        query_pre_attn_scalar=int(qscalar or head_dim), rope_global_scale=rope_scale, name="tiny",
    )


def random_model(cfg: Gemma3Config, seed=0, dtype=torch.float32) -> Gemma3:
    """Random weights with non-trivial norms (zero-centred weights would hide a (1 + w) bug)."""
    torch.manual_seed(seed)
    model = Gemma3(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08))
    return model.to(dtype).eval()


@pytest.fixture
def one_thread():
    """Tiny models on one thread (more only add contention); the count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return random_model(tiny_config())


def run_cli(args, capsys):
    """Runs the gemma3 CLI in-process; returns (exit code, stdout, stderr)."""
    from gemma3.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
