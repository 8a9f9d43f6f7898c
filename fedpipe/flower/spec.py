"""The codec settings a fedpipe strategy announces to devices in every message's config.

fedpipe's own apps read their settings from the run config on both sides. A Flower app
that only adds `fedpipe_mod` to its ClientApp has no fedpipe config on the device: the
server's wrapper (`compress`) writes the uplink and downlink codec settings into each
train and evaluate config under `fedpipe.` keys, and the mod builds its codecs from
them. They are instructions from the aggregator, validated like any config (a relay
that altered them could only change the compression; sealing is the device's own
decision, from its own node config).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, ConfigRecordValues

from fedpipe.config import CodecConfig, DownlinkConfig, config_from_dict

__all__ = ["PREFIX", "announce", "announced"]

PREFIX = "fedpipe."
_CODEC_KEYS = ("scheme", "chunk_size", "topk", "topk_bits", "error_feedback", "max_staleness")
_DOWNLINK_KEYS = ("scheme", "chunk_size", "topk", "topk_bits", "error_feedback")


def announce(codec: CodecConfig, downlink: DownlinkConfig) -> dict[str, ConfigRecordValues]:
    """The `fedpipe.` config entries that tell a device's mod how to encode and decode."""
    out: dict[str, ConfigRecordValues] = {
        f"{PREFIX}codec.{k}": getattr(codec, k) for k in _CODEC_KEYS
    }
    out.update({f"{PREFIX}downlink.{k}": getattr(downlink, k) for k in _DOWNLINK_KEYS})
    return out


def announced(config: ConfigRecord | Mapping[str, object]) -> tuple[CodecConfig, DownlinkConfig]:
    """The codecs a message's config announces (float32 both ways if it announces none).

    Raises ConfigError (naming the key) for values no fedpipe strategy would send.
    """
    sections: dict[str, dict[str, object]] = {"codec": {}, "downlink": {}}
    for key, value in config.items():
        if key.startswith(PREFIX):
            name, _, field = key.removeprefix(PREFIX).partition(".")
            sections.setdefault(name, {})[field] = value
    cfg = config_from_dict(sections)  # typed and range-checked like any config
    return cfg.codec, cfg.downlink
