"""Data in shards: deterministic, atomic TFRecord shards of the index, and training streaming from them."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import yaml

from pipeline.core.config import ShardsParams
from pipeline.core.errors import DataError
from pipeline.data.version import index_fingerprint
from pipeline.modeling import inputs as dp
from pipeline.modeling import records
from pipeline.modeling.preprocess import decode_image
from pipeline.steps import stages
from tests.conftest import REPO, rooted_params


def _root(folder: Path) -> Path:
    return folder / "data" / "raw"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def sharded(synthetic_index: tuple[Path, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory):
    folder, index = synthetic_index
    out = tmp_path_factory.mktemp("shards") / "shards"
    manifest = records.write_shards(index, _root(folder), ShardsParams(out=str(out), images_per_shard=50))
    return folder, index, out, manifest


def test_two_writes_are_byte_identical(sharded, tmp_path: Path) -> None:
    folder, index, out, _ = sharded
    again = tmp_path / "again"
    shuffled = index.sample(frac=1, random_state=3)
    records.write_shards(shuffled, _root(folder), ShardsParams(out=str(again), images_per_shard=50))
    assert _tree(out) == _tree(again)
    gz = [tmp_path / "gz1", tmp_path / "gz2"]
    for target in gz:
        records.write_shards(index, _root(folder), ShardsParams(out=str(target), compression="gzip"))
    assert _tree(gz[0]) == _tree(gz[1])
    manifest = records.load_manifest(gz[0])
    got = list(records.read_records(records.shard_files(gz[0], manifest, "val"), "gzip").as_numpy_iterator())
    assert [r["path"].decode() for r in got] == records.usable_rows(index, "val")["path"].tolist()


def test_round_trip_every_record_equals_its_row_and_file(sharded) -> None:
    folder, index, out, manifest = sharded
    assert manifest["index_fingerprint"] == index_fingerprint(index)
    for split in ("train", "val", "test"):
        rows = records.usable_rows(index, split)
        entry = manifest["splits"][split]
        assert entry["images"] == len(rows) == sum(s["images"] for s in entry["shards"])
        assert entry["labels"] == rows["label"].value_counts().to_dict()
        for s in entry["shards"]:
            assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        got = list(records.read_records(records.shard_files(out, manifest, split)).as_numpy_iterator())
        assert len(got) == len(rows)
        for rec, (_, row) in zip(got, rows.iterrows(), strict=True):
            assert rec["image"] == (_root(folder) / row["path"]).read_bytes()
            for key in records.TEXT_FIELDS:
                assert rec[key].decode() == str(row[key])
            assert (rec["width"], rec["height"]) == (row["width"], row["height"])
    assert len(manifest["splits"]["train"]["shards"]) == -(-manifest["splits"]["train"]["images"] // 50)


def test_changed_file_fails_in_one_line_and_leaves_nothing(synthetic_index, tmp_path: Path) -> None:
    folder, index = synthetic_index
    rows = records.usable_rows(index, "train")
    bad = index.copy()
    bad.loc[rows.index[len(rows) // 2], "sha256"] = "0" * 64  # the file no longer matches its index row
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=r"changed since it was indexed") as err:
        records.write_shards(bad, _root(folder), ShardsParams(out=str(out)))
    assert "\n" not in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half shard set, no temporary left
    missing = index.copy()
    missing.loc[rows.index[0], "path"] = "train/NORMAL/nowhere.jpeg"
    with pytest.raises(DataError, match=r"cannot read .*nowhere\.jpeg"):
        records.write_shards(missing, _root(folder), ShardsParams(out=str(out)))
    assert list(tmp_path.iterdir()) == []


def test_shards_of_another_index_are_refused(sharded) -> None:
    _, index, out, manifest = sharded
    with pytest.raises(DataError, match="written from another index"):
        records.check_manifest(manifest, index.iloc[1:], out)
    with pytest.raises(DataError, match="run `pneumo shard`"):
        records.load_manifest(out.parent / "none")


def test_shards_of_an_index_whose_decodable_flags_changed_are_refused_by_path(sharded) -> None:
    """The fingerprint (path, split, sha256) does not see `decodable`: a row that became decodable (a new decoder)
    is missing from the shards, one that became undecodable is still in them. Either is named, before training
    fails inside TensorFlow on a record count."""
    _, index, out, manifest = sharded
    assert manifest["undecodable"] == sorted(index.loc[~index["decodable"], "path"])
    records.check_manifest(manifest, index, out)  # the index the shards were written from
    path = records.usable_rows(index, "train")["path"].iloc[3]
    flipped = index.assign(decodable=index["decodable"] & (index["path"] != path))
    with pytest.raises(DataError, match=rf"^the shards in .* still hold {path} .*: run `pneumo shard`") as err:
        records.check_manifest(manifest, flipped, out)
    assert "\n" not in str(err.value)
    stale = {**manifest, "undecodable": sorted([*manifest["undecodable"], path])}  # written while `path` failed
    with pytest.raises(DataError, match=rf"^the shards in .* lack {path} .*: run `pneumo shard`"):
        records.check_manifest(stale, index, out)
    with pytest.raises(DataError, match=r"format 'pneumo-shards/1', expected 'pneumo-shards/2': run `pneumo shard`"):
        older = out.parent / "older"
        older.mkdir(exist_ok=True)
        (older / records.MANIFEST).write_text(json.dumps({**manifest, "format": "pneumo-shards/1"}))
        records.load_manifest(older)


def test_streamed_dataset_matches_files(sharded) -> None:
    folder, index, out, manifest = sharded
    files = dp.split_data(index, "train", _root(folder), "binary")
    shards = dp.SplitData(**{**files.__dict__, "shards": tuple(records.shard_files(out, manifest, "train"))})
    weights = dp.class_weights(files.labels, 2)

    def labels(data: dp.SplitData) -> Counter:
        ds = dp.make_dataset(data, 32, 16, training=True, seed=1, weights=weights, shuffle_buffer=20)
        ds = ds.take(dp.steps_per_epoch(len(data), 16))  # training batches never end: one epoch
        batches = list(ds.as_numpy_iterator())
        assert all(len(b) == 3 and b[0].shape[1:] == (32, 32, 1) for b in batches)  # images, labels, weights
        return Counter(np.concatenate([b[1] for b in batches]).tolist())

    assert labels(shards) == labels(files) == Counter(files.labels.astype(float).tolist())
    # Not training: the same images in the same order, decoded by the one preprocessing function.
    first_stream = next(iter(dp.make_dataset(shards, 32, 8)))[0].numpy()
    first_files = next(iter(dp.make_dataset(files, 32, 8)))[0].numpy()
    np.testing.assert_array_equal(first_stream, first_files)
    expected = decode_image(Path(files.paths[0]).read_bytes(), 32).numpy()
    np.testing.assert_array_equal(first_stream[0], expected)
    # Evaluation batches state their count (Keras then never runs past the end), checked against the records.
    assert int(dp.make_dataset(shards, 32, 8).cardinality()) == dp.steps_per_epoch(len(shards), 8)
    missing = dp.SplitData(**{**shards.__dict__, "keys": [*shards.keys[:-1], "not/in/any/shard.jpeg"]})
    with pytest.raises(tf.errors.FailedPreconditionError, match="expected to contain"):
        list(dp.make_dataset(missing, 32, 8, cache=False))
    # A stratified subset reads only its own records.
    subset = dp.split_data(index, "train", _root(folder), "binary", limit=40, seed=0)
    subset = dp.SplitData(**{**subset.__dict__, "shards": shards.shards})
    got = np.concatenate([b[1] for b in dp.make_dataset(subset, 32, 16).as_numpy_iterator()])
    np.testing.assert_array_equal(got, subset.labels)


def test_cached_training_decodes_the_shards_once(sharded, tmp_path: Path) -> None:
    """With `cache`, epochs after the first come from memory: the shard files can go, and every epoch still
    holds each image once. Streamed (no cache), the next epochs read the files again and fail without them."""
    folder, index, out, manifest = sharded
    files = dp.split_data(index, "train", _root(folder), "binary")
    steps = dp.steps_per_epoch(len(files), 16)

    def epochs(cache: bool) -> tuple[list[np.ndarray], object]:
        copies = tmp_path / f"cache-{cache}"
        copies.mkdir()
        shards = [str(copies / Path(f).name) for f in records.shard_files(out, manifest, "train")]
        for source, copy in zip(records.shard_files(out, manifest, "train"), shards, strict=True):
            Path(copy).write_bytes(Path(source).read_bytes())
        data = dp.SplitData(**{**files.__dict__, "shards": tuple(shards)})
        batches = iter(dp.make_dataset(data, 32, 16, training=True, seed=1, shuffle_buffer=20, cache=cache))
        first = np.concatenate([next(batches)[0] for _ in range(steps)])
        for shard in shards:
            Path(shard).unlink()
        return [first], batches

    def fingerprint(images: np.ndarray) -> list[float]:  # the multiset of images, in any order
        return sorted(np.round(images.reshape(len(images), -1).astype(np.float64) @ np.arange(32 * 32), 1))

    seen, batches = epochs(cache=True)
    for _ in range(2):
        seen.append(np.concatenate([next(batches)[0] for _ in range(steps)]))
    assert all(len(epoch) == len(files) for epoch in seen)
    assert fingerprint(seen[1]) == fingerprint(seen[0]) == fingerprint(seen[2])
    assert not np.array_equal(seen[1], seen[2])  # reshuffled every epoch
    _, streamed = epochs(cache=False)
    with pytest.raises(tf.errors.NotFoundError):
        for _ in range(3 * steps):
            next(streamed)


def test_cache_limit_counts_the_reshuffle_copy() -> None:
    assert dp.cache_megabytes(1024, 128, training=False) == 16.0  # 16 KiB per 128 x 128 uint8 image
    assert dp.cache_megabytes(1024, 128, training=True) == 32.0
    assert dp.fits_in_memory(1024, 128, 32, training=True)
    assert not dp.fits_in_memory(1025, 128, 32, training=True)
    assert not dp.fits_in_memory(1, 16, 0, training=False)  # 0: never
    from pipeline.modeling.training import cache_note

    assert cache_note(1024, 128, 32) == "decoded once, kept in memory (32 MB)"
    assert cache_note(2048, 128, 32) == "decoded every epoch (64 MB cached would exceed train.memory_cache_mb 32)"


def test_state_key_covers_input_and_shards(sharded, tmp_path: Path) -> None:
    from pipeline.modeling.training import state_key

    folder, index, out, _ = sharded
    params = rooted_params(folder, f"shards.out={out}")
    files = rooted_params(folder, f"shards.out={out}", "train.input=files")
    key = state_key(params, index)
    assert key != state_key(files, index)
    other = tmp_path / "other"
    records.write_shards(index, _root(folder), ShardsParams(out=str(other), images_per_shard=7))
    assert key != state_key(rooted_params(folder, f"shards.out={other}"), index)
    # The memory limit counts only through its decision: both limits cache this split, 0 never does
    assert key == state_key(rooted_params(folder, f"shards.out={out}", "train.memory_cache_mb=4096"), index)
    assert key != state_key(rooted_params(folder, f"shards.out={out}", "train.memory_cache_mb=0"), index)


def test_state_key_covers_the_weights_file_and_every_module_training_runs(sharded, tmp_path: Path) -> None:
    from pipeline.modeling.training import state_key, training_code

    modules = {Path(f).relative_to(REPO).as_posix() for f in training_code()}
    assert {"pipeline/modeling/lung_crop.py", "pipeline/modeling/clahe.py", "pipeline/modeling/inputs.py"} <= modules
    folder, index, out, _ = sharded
    weights = tmp_path / "start.weights.h5"
    weights.write_bytes(b"first")
    key = state_key(rooted_params(folder, f"shards.out={out}", f"model.weights={weights}"), index)
    weights.write_bytes(b"second")  # the same path, other weights: another training
    assert key != state_key(rooted_params(folder, f"shards.out={out}", f"model.weights={weights}"), index)


def test_shard_stage_is_in_dvc_yaml() -> None:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = list(spec)
    assert names.index("validate") < names.index("shard") < names.index("train")
    assert spec["shard"]["cmd"] == "pneumo shard" and spec["shard"]["outs"] == ["data/shards"]
    assert "data/shards" in spec["train"]["deps"] and "pipeline/modeling/records.py" in spec["shard"]["deps"]
    assert "shards" in spec["shard"]["params"]
    files_mode = rooted_params(Path("/x"), "train.input=files")
    train = next(s for s in stages.stages(files_mode) if s.name == "train")
    assert files_mode.data.root in train.data_deps and files_mode.shards.out not in train.data_deps
    assert json.loads(json.dumps(spec["shard"]))  # plain data
