"""Data in shards: each split's images packed into TFRecord files, and the reader training streams them from.

Each record holds one image's ORIGINAL encoded bytes (the JPEG folder stays the source of truth: nothing
is re-encoded or resized) and its index fields. A split's usable (decodable) rows are written sorted by
path, ``images_per_shard`` to a file named ``<split>-NNNNN-of-NNNNN.tfrecord``, beside ``manifest.json``
(shard files with their sha256 and counts, counts per split and label, the index fingerprint, and the
paths left out as undecodable: the fingerprint does not cover ``decodable``). Same
index and bytes give byte-identical shards: no timestamps, a fixed record layout, a fixed order. The
folder is written to a temporary sibling and renamed into place, so a failure leaves the old set or none.

The reader lists a split's shards from the manifest, reads them with an interleave (parallel, in a
deterministic order), shuffles encoded records in a bounded buffer, then decodes in parallel with the
one preprocessing function, ``preprocess.decode_image``. ``inputs.make_dataset`` then keeps the decoded
images of a split that fits ``train.memory_cache_mb`` in memory and streams (decodes every epoch, memory
flat however large the data set) one that does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import tensorflow as tf

from pipeline.core.atomic import staged_dir
from pipeline.core.config import SPLITS, ShardsParams
from pipeline.core.errors import DataError
from pipeline.core.hashing import file_sha256
from pipeline.data.version import index_fingerprint

MANIFEST = "manifest.json"
FORMAT = "pneumo-shards/2"  # 2: the manifest lists the undecodable paths left out
TEXT_FIELDS = ("path", "split", "label", "subtype", "patient_id", "sha256")
INT_FIELDS = ("width", "height")
FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    **{k: tf.io.FixedLenFeature([], tf.string) for k in TEXT_FIELDS},
    **{k: tf.io.FixedLenFeature([], tf.int64) for k in INT_FIELDS},
}
_COMPRESSION = {"none": "", "gzip": "GZIP", "zlib": "ZLIB"}


def usable_rows(index: pd.DataFrame, split: str) -> pd.DataFrame:
    """One split's decodable rows in path order: what a shard set holds, and the order it holds them in."""
    return index[(index["split"] == split) & index["decodable"]].sort_values("path", kind="stable")


def _undecodable(index: pd.DataFrame) -> list[str]:
    """The indexed paths no shard holds, sorted: with the fingerprint (path, split, sha256), this pins the
    exact set of paths a shard set holds."""
    return sorted(index.loc[~index["decodable"].astype(bool), "path"].astype(str))


def _example(row: pd.Series, image: bytes) -> bytes:
    def text(value: object) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(value).encode()]))

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        **{k: text(row[k]) for k in TEXT_FIELDS},
        **{k: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row[k])])) for k in INT_FIELDS},
    }
    # Fields are serialized in key order (protobuf maps are sorted on deterministic serialization).
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _read_checked(root: Path, row: pd.Series) -> bytes:
    file = root / row["path"]
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataError(f"shard: cannot read {file} ({exc.strerror or exc}); re-run `pneumo index`") from None
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise DataError(f"shard: {file} changed since it was indexed (sha256 differs); re-run `pneumo index`")
    return data


def write_shards(index: pd.DataFrame, root: str | Path, params: ShardsParams) -> dict:
    """Pack every split of `index` (images under `root`) into ``params.out``; returns the manifest."""
    root, out = Path(root), Path(params.out)
    options = tf.io.TFRecordOptions(compression_type=_COMPRESSION[params.compression])
    manifest: dict = {
        "format": FORMAT,
        "index_fingerprint": index_fingerprint(index),
        "compression": params.compression,
        "images_per_shard": params.images_per_shard,
        "undecodable": _undecodable(index),
        "splits": {},
    }
    with staged_dir(out) as tmp:
        for split in SPLITS:
            rows = usable_rows(index, split)
            if rows.empty:
                continue
            count = -(-len(rows) // params.images_per_shard)
            shards = []
            for i in range(count):
                part = rows.iloc[i * params.images_per_shard : (i + 1) * params.images_per_shard]
                name = f"{split}-{i:05d}-of-{count:05d}.tfrecord"
                with tf.io.TFRecordWriter(str(tmp / name), options) as writer:
                    for _, row in part.iterrows():
                        writer.write(_example(row, _read_checked(root, row)))
                shards.append({"file": name, "images": len(part), "sha256": file_sha256(tmp / name)})
            manifest["splits"][split] = {
                "images": len(rows),
                "labels": {k: int(v) for k, v in sorted(rows["label"].value_counts().items())},
                "shards": shards,
            }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def load_manifest(out: str | Path) -> dict:
    file = Path(out) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(
            f"no shards at {out} ({MANIFEST} missing): run `pneumo shard`, or set train.input: files"
        ) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: not valid JSON ({exc.msg}): run `pneumo shard` again") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}: run `pneumo shard` again")
    return manifest


def check_manifest(manifest: dict, index: pd.DataFrame, out: str | Path) -> None:
    """Shards written from another index (other data, or an index re-built since) are refused by name."""
    current = index_fingerprint(index)
    if manifest["index_fingerprint"] != current:
        raise DataError(
            f"the shards in {out} were written from another index (fingerprint {manifest['index_fingerprint']}, "
            f"the index is {current}): run `pneumo shard` (dvc repro does)"
        )
    # Same rows, but `decodable` flipped since (e.g. a new decoder): the shards hold another set of images.
    was, now = set(manifest["undecodable"]), set(_undecodable(index))
    if was != now:
        path, state = (min(was - now), "lack") if was - now else (min(now - was), "still hold")
        raise DataError(
            f"the shards in {out} {state} {path} (decodable changed in the index since they were written): "
            "run `pneumo shard` (dvc repro does)"
        )


def manifest_digest(out: str | Path) -> str | None:
    """The manifest's hash (it names every shard's sha256), or None where there are no shards."""
    file = Path(out) / MANIFEST
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def shard_files(out: str | Path, manifest: dict, split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise DataError(f"the shards in {out} hold no {split!r} split: run `pneumo shard`")
    files = [str(Path(out) / s["file"]) for s in manifest["splits"][split]["shards"]]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"shard file {missing[0]} is missing ({len(missing)} in all): `dvc pull` or `pneumo shard`")
    return files


def parse(record: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(record, FEATURES)


def read_records(files: list[str], compression: str = "none") -> tf.data.Dataset:
    """Every record of `files`, in file order then record order (e.g. for round-trip checks)."""
    return tf.data.TFRecordDataset(files, compression_type=_COMPRESSION[compression]).map(parse)


def stream(
    files: list[str],
    keys: list[str],
    labels: list[int],
    *,
    compression: str = "none",
    training: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 4096,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """(encoded image bytes, class id) for the records whose path is in `keys` (labelled by `labels`).

    Not `training`: the files one after the other, so records come in path order, as the index lists them.
    `training`: the file order reshuffled each epoch, files interleaved (read in parallel; `deterministic`
    keeps the order reproducible for a seed), records shuffled in a buffer of `shuffle_buffer`.
    """
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.constant(labels, tf.int64)), default_value=-1
    )
    kind = _COMPRESSION[compression]
    names = tf.data.Dataset.from_tensor_slices(files)
    if training and len(files) > 1:
        names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if training and len(files) > 1:  # several files read at once, in an order fixed by the seed
        ds = names.interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type=kind),
            cycle_length=min(len(files), 4),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
    else:
        ds = tf.data.TFRecordDataset(names, compression_type=kind)
    fields = {"image": FEATURES["image"], "path": FEATURES["path"]}

    def pick(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        row = tf.io.parse_single_example(record, fields)
        return row["image"], table.lookup(row["path"])

    ds = ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda image, label: label >= 0)
    if training:
        ds = ds.shuffle(min(shuffle_buffer, len(keys)), seed=seed, reshuffle_each_iteration=True)
    return ds
