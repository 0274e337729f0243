"""The shard stage: pack each split's usable images into TFRecord shards for streamed training."""

from __future__ import annotations

from pipeline.core.config import Params
from pipeline.data.dataset_index import read_index
from pipeline.modeling import records


def run(params: Params) -> str:
    manifest = records.write_shards(read_index(params.index.path), params.data.root, params.shards)
    parts = [f"{s} {m['images']} images in {len(m['shards'])} shard(s)" for s, m in manifest["splits"].items()]
    return f"sharded {'; '.join(parts)} -> {params.shards.out} (index {manifest['index_fingerprint']})"
