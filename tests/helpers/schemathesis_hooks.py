"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): generated bodies name the served
model, so fuzzed requests reach tokenization, sampling and the engine instead of stopping at the
404 for an unknown model."""

import os

import schemathesis


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = os.environ["GEMMA3_FUZZ_MODEL"]
    return body
