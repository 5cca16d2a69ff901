"""The paper's architecture and distillation studies in miniature: small models trained
from scratch on CPU with the training stack of `gemma3.train`, each study one command with a JSON
result and a PNG plot.

| module | what it holds |
|---|---|
| `tiny` | the byte-level tokenizer, the train / held-out text split, tiny configs, one train-and-evaluate run |
| `ablation` | `study ratio` (local:global 1:1…7:1 and global only, Fig. 3) and `study window` (Fig. 4) |
| `teacher` | `study teacher`: one student distilled from a small and a large teacher per token budget (Fig. 8) |
| `commands` | the `gemma3 study ratio | window | teacher` subcommands |
"""
