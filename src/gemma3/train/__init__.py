"""Training: distillation with sampled teacher logits, SFT (full or LoRA), QAT, and
scale-out with torchrun + DDP/FSDP. One loop (`trainer`), several target sources:

| module | what it holds |
|---|---|
| `data` | files → documents (chat: loss on model turns) → packed sequences → deterministic batch order |
| `losses` | fused tied-head cross-entropy against sparse (sampled / one-hot) or dense (teacher) targets |
| `distill` | the 256-sample sparse teacher target, on the fly or precomputed into a memory-mapped store |
| `lora` | LoRA as a module swap; merge; PEFT-layout adapters |
| `qat` | fake quantization (straight-through) in `gemma3 quantize`'s recipe; dense teacher targets |
| `trainer` | AdamW + warm-up/cosine, accumulation, clipping, bf16 autocast, checkpointing, metrics |
| `checkpoint` | save / exact resume (weights as HF safetensors, optimizer, RNG, data position) |
| `distributed` | torchrun process group, DDP / FSDP2 wrapping |
| `student` | student configs (preset / JSON) and initialisation |
| `sandbox`, `rewards`, `tasks` | code execution under limits; verifiable rewards and their weighted sum; procedural tasks |
| `rl`, `grpo` | GRPO / RLOO objectives; the rollout → reward → update loop behind `gemma3 rl` |
| `rollout` | group samples on the batched decode; the quantized engine with the trained LoRA adapter unmerged |
| `reward_model` | Bradley–Terry reward models (backbone + scalar head) and WARM weight averaging (`gemma3 rm`) |
| `merge` | WARP's merges: SLERP of task vectors, LITI, averaging, EMA anchor (`gemma3 merge`) |
| `bond` | J-BOND best-of-N distillation with a moving anchor (`gemma3 rl bond`) |
| `commands` | the `gemma3 distill | finetune | qat` subcommands |
"""
