"""Small helpers shared by the command-line tools."""
from __future__ import annotations

import re
from typing import List

import mxnet as mx


def parse_context(text: str) -> mx.Context:
    """'cpu(0)', 'gpu(1)', 'cpu' or 'gpu1' -> mx.Context."""
    match = re.fullmatch(r"\s*(cpu|gpu)\s*\(?\s*(\d*)\s*\)?\s*", text)
    if not match:
        raise ValueError(f"not a device: {text!r} (expected e.g. cpu(0) or gpu(1))")
    return mx.Context(match.group(1), int(match.group(2) or 0))


def parse_devices(gpus: str = "", cpus: int = 0) -> List[mx.Context]:
    """Devices from the release's `--gpus 0,1` or our `--cpus N`; neither means one CPU."""
    if gpus and cpus:
        raise ValueError("give either --gpus or --cpus, not both")
    if gpus:
        return [mx.gpu(int(i)) for i in gpus.split(",") if i.strip()]
    return [mx.cpu(i) for i in range(max(cpus, 1))]
