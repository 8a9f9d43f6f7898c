"""Secure aggregation of quantized updates (SecAgg / SecAgg+) on fedpipe's round engine.

The aggregator learns only the sum of a round's updates: devices quantize onto a grid
the aggregator fixes, add pairwise masks that cancel in the sum and a self mask, and
secret-share what the aggregator needs to remove the masks of devices that drop out.
`server.SecAggRound` runs the stages; `device` is each device's side; `shamir`, `keys`,
`masks`, `graph` and `quant` are the parts.
"""

from __future__ import annotations
