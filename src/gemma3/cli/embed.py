"""`gemma3 embed`: text embeddings, the same vectors /v1/embeddings serves."""

from __future__ import annotations

import json

from ..inference.embed import POOLINGS
from . import options


def register(sub):
    p = sub.add_parser("embed", help="embed texts: pooled, L2-normalised last hidden states",
                       description="Prints each text's embedding size and first values and, for several texts, "
                                   "their cosine similarities. Example: gemma3 embed \"a cat\" \"a kitten\" \"a car\"")
    p.add_argument("texts", nargs="+", help="texts to embed, one vector each")
    p.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="mean of every position, or the last token's state (default mean)")
    options.add(p, *options.MODEL, "json", helps={"json": "print {model, pooling, embeddings: [[...], ...]}"})
    p.set_defaults(func=cmd_embed)


def cmd_embed(args):
    from ..inference.embed import embed
    from ..inference.prompt import encode_prompt

    model, tok = options.load_model(args)
    vectors = [embed(model, encode_prompt(tok, text), args.pooling) for text in args.texts]
    if args.json:
        print(json.dumps({"model": str(args.model or "embedded"), "pooling": args.pooling,
                          "embeddings": [v.tolist() for v in vectors]}))
        return
    for i, (text, v) in enumerate(zip(args.texts, vectors)):
        head = " ".join(f"{x:+.4f}" for x in v[:6].tolist())
        print(f"[{i}] {len(v)} dims  {head} …  {text[:60]!r}")
    if len(vectors) > 1:
        print("cosine similarity:")
        for i, a in enumerate(vectors):
            print(f"[{i}] " + "  ".join(f"{float(a @ b):6.3f}" for b in vectors))
