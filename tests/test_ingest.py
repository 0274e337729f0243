"""Ingest from local folders and archives, real data included."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.core.config import Params
from pipeline.core.errors import DataError
from pipeline.data import dataset_index, ingest, source, splits, validation
from pipeline.steps import stages

pytestmark = pytest.mark.realdata


def _folder_counts(root: Path) -> dict[tuple[str, str], int]:
    return {(s.name, c.name): len(list(c.iterdir())) for s in root.iterdir() if s.is_dir() for c in s.iterdir()}


def test_real_224_ingest_index_validate(real_224: Path, params_in: Callable[..., Params]) -> None:
    params = params_in("data.source=local", f"data.local_path={real_224}")
    result = ingest.ingest(params.data)
    assert dict(result.counts) == _folder_counts(real_224)
    assert result.counts[("train", "NORMAL")] == 1165 and result.counts[("test", "PNEUMONIA")] == 614
    stages.run_stage("index", params)
    index = dataset_index.read_index(params.index.path)
    assert len(index) == 5232 and index["decodable"].all()
    official = index.groupby(["official_split", "label"]).size().to_dict()
    assert official == {
        ("train", "NORMAL"): 1165,
        ("train", "PNEUMONIA"): 3261,
        ("val", "NORMAL"): 8,
        ("val", "PNEUMONIA"): 8,
        ("test", "NORMAL"): 176,
        ("test", "PNEUMONIA"): 614,
    }
    assert (index.loc[index["split"] == "test", "official_split"] == "test").all()
    patients = index.groupby("patient_id")["split"].nunique()
    assert patients.max() == 1, "a patient is in two splits"
    val_share = (index["split"] == "val").sum() / index["official_split"].isin(["train", "val"]).sum()
    assert 0.12 < val_share < 0.18  # 15% of patients, carved by patient
    report = validation.validate(index, params.validation)
    assert report.success, report.summary()
    assert report.counts["test"] == {"NORMAL": 176, "PNEUMONIA": 614}
    assert Path(params.validation.data_docs, "index.html").is_file()


def test_fullres_sample_ingest_and_index(real_fullres: Path, params_in: Callable[..., Params]) -> None:
    params = params_in("data.source=local", f"data.local_path={real_fullres}", "data.flat_layout_split=test")
    result = ingest.ingest(params.data)
    assert result.counts == {("test", "NORMAL"): 24, ("test", "PNEUMONIA"): 24}
    index = dataset_index.build_index(params.data.root)
    assert index["decodable"].all()
    assert set(index["mode"]) == {"L", "RGB"}
    assert index["width"].max() >= 2000 and index["height"].min() < 224
    assert index["patient_id"].str.match(r"^test/((NORMAL2-)?IM-\d+|person\d+)$").all()  # test/ numbers its own


def _kaggle_like_zip(src: Path, archive: Path) -> None:
    """What the real Kaggle archive holds: chest_xray/ plus a nested copy, macOS junk, odd cases and suffixes."""
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(src.rglob("*.jpeg")):
            rel = f.relative_to(src)
            split, label = rel.parts[0], rel.parts[1]
            name = f.name
            if split == "val":
                split, label = "VAL", label.lower()  # any letter case
            if f.name.startswith("IM-0"):
                name = f.stem + ".jpg"
            z.write(f, f"chest_xray/{split}/{label}/{name}")
            z.write(f, f"chest_xray/chest_xray/{rel.as_posix()}")  # the nested duplicate
            z.writestr(f"__MACOSX/chest_xray/{rel.parent.as_posix()}/._{f.name}", b"\x00\x05\x16\x07junk")
        z.writestr("chest_xray/.DS_Store", b"\x00\x00\x00\x01Bud1")
        z.writestr("chest_xray/train/NORMAL/.DS_Store", b"\x00\x00\x00\x01Bud1")
        z.writestr("chest_xray/train/NORMAL/notes.txt", b"not an image")


def test_kaggle_archive_quirks_zip(real_subset: Path, tmp_path: Path, params_in: Callable[..., Params]) -> None:
    archive = tmp_path / "chest-xray-pneumonia.zip"
    _kaggle_like_zip(real_subset, archive)
    params = params_in("data.source=local", f"data.local_path={archive}")
    result = ingest.ingest(params.data)
    assert dict(result.counts) == _folder_counts(real_subset)
    assert result.skipped == ["chest_xray/train/NORMAL/notes.txt"]
    assert result.nested == {"chest_xray/chest_xray": result.total}  # the nested copy: named, not imported
    assert f"ignored a nested copy of the data set: chest_xray/chest_xray/ ({result.total} files)" in result.summary()
    root = Path(params.data.root)
    assert not list(root.rglob("._*")) and not list(root.rglob(".DS_Store"))
    assert any(p.suffix == ".jpg" for p in root.glob("train/NORMAL/*"))
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "val"]


def test_png_and_uppercase_folders(real_subset: Path, tmp_path: Path, params_in: Callable[..., Params]) -> None:
    from PIL import Image

    src = tmp_path / "mixed"
    shutil.copytree(real_subset, src / "Chest_Xray")
    (src / "Chest_Xray" / "train").rename(src / "Chest_Xray" / "TRAIN")
    jpeg = next((src / "Chest_Xray" / "TRAIN" / "NORMAL").iterdir())
    Image.open(jpeg).save(jpeg.with_suffix(".png"))
    jpeg.unlink()
    params = params_in("data.source=local", f"data.local_path={src}")
    ingest.ingest(params.data)
    index = dataset_index.build_index(params.data.root)
    assert index["decodable"].all()
    assert (index["path"].str.endswith(".png")).sum() == 1
    assert set(index["official_split"]) == {"train", "val", "test"}


def test_failed_ingest_keeps_previous_data(params_in: Callable[..., Params], tmp_path: Path) -> None:
    params = params_in("data.synthetic.counts={train: {normal: 3, bacteria: 2, virus: 1}}")
    ingest.ingest(params.data)
    before = sorted(p.name for p in Path(params.data.root).rglob("*.jpeg"))
    bad = params_in("data.source=local", f"data.local_path={tmp_path / 'missing'}")
    with pytest.raises(DataError, match="missing: no such file or folder"):
        ingest.ingest(bad.data)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no images in a"):
        ingest.ingest(params_in("data.source=local", f"data.local_path={empty}").data)
    assert sorted(p.name for p in Path(params.data.root).rglob("*.jpeg")) == before
    assert not [p for p in Path(params.data.root).parent.iterdir() if p.name.startswith(".")]


def test_split_is_grouped_and_deterministic(real_subset: Path) -> None:
    index = dataset_index.build_index(real_subset)
    from pipeline.core.config import SplitParams

    a = splits.assign_splits(index, SplitParams(val_fraction=0.3, seed=1))
    b = splits.assign_splits(index, SplitParams(val_fraction=0.3, seed=1))
    c = splits.assign_splits(index, SplitParams(val_fraction=0.3, seed=2))
    assert a["split"].tolist() == b["split"].tolist() != c["split"].tolist()
    assert a.groupby("patient_id")["split"].nunique().max() == 1
    assert set(a.loc[a["split"] == "val", "label"]) == {"NORMAL", "PNEUMONIA"}  # stratified


def test_source_fingerprint_follows_the_files(
    real_subset: Path, tmp_path: Path, params_in: Callable[..., Params]
) -> None:
    """The fingerprint ingest's DVC state is keyed by: the same for an untouched folder, another one when a file
    is added, removed or rewritten; a zip's table of contents, the same for a copy; a missing path names
    data.local_path; a broken link is left out, as ingest leaves it out."""
    folder = tmp_path / "hospital"
    shutil.copytree(real_subset, folder)
    params = params_in("data.source=local", f"data.local_path={folder}").data
    first = source.fingerprint(params)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert first["kind"] == "folder" and first["files"] == len(files) and first["local_path"] == str(folder)
    assert first["bytes"] == sum(p.stat().st_size for p in files)
    assert source.fingerprint(params) == first
    one = next(folder.rglob("*.jpeg"))
    added = one.with_name("added.jpeg")
    shutil.copy2(one, added)
    with_added = source.fingerprint(params)
    assert with_added["files"] == first["files"] + 1 and with_added["listing_sha256"] != first["listing_sha256"]
    added.unlink()
    (folder / "gone.jpeg").symlink_to(tmp_path / "nowhere.jpeg")
    assert source.fingerprint(params) == first  # the same files again: the same fingerprint
    one.write_bytes(one.read_bytes() + b"\0")  # rewritten in place: size and time move
    assert source.fingerprint(params)["listing_sha256"] != first["listing_sha256"]

    archive = tmp_path / "hospital.zip"
    shutil.make_archive(str(archive.with_suffix("")), "zip", folder)
    zipped = source.fingerprint(params_in("data.source=local", f"data.local_path={archive}").data)
    copy = shutil.copy(archive, tmp_path / "copy.zip")  # a new file time: the same contents
    assert (
        source.fingerprint(params_in("data.source=local", f"data.local_path={copy}").data)["listing_sha256"]
        == (zipped["listing_sha256"])
    )
    assert zipped["kind"] == "file" and zipped["bytes"] == sum(p.stat().st_size for p in files)
    assert source.fingerprint(params_in().data) == {"source": "synthetic"}
    kaggle = source.fingerprint(params_in("data.source=kaggle").data)  # nothing downloaded for it
    assert kaggle == {"source": "kaggle", "dataset": "paultimothymooney/chest-xray-pneumonia"}
    with pytest.raises(DataError, match=r"^/nowhere: no such file or folder \(data\.local_path\)$"):
        source.fingerprint(params_in("data.source=local", "data.local_path=/nowhere").data)

    # The stress stage's originals, the same way; a missing folder is recorded, and stops the stress stage.
    assert source.originals_fingerprint(params_in().stress) == {"originals": None}
    originals = source.originals_fingerprint(params_in(f"stress.originals={folder / 'train'}").stress)
    assert originals["files"] == len(list((folder / "train").rglob("*.jpeg")))
    assert originals["originals"] == str(folder / "train")
    # Read as external validation reads a folder: the Kaggle layout (its test/) and any letter case will do
    # (of the Kaggle layout, its test/ only: the stress stage copies, counts and scores that, not train/ and val/)
    kaggle = params_in(f"stress.originals={folder}").stress
    assert source.originals_folder(kaggle) == folder / "test"
    assert source.originals_fingerprint(kaggle)["files"] == len(list((folder / "test").rglob("*.jpeg")))
    (folder / "val" / "NORMAL").rename(folder / "val" / "normal")
    assert source.originals_folder(params_in(f"stress.originals={folder / 'val'}").stress) == folder / "val"
    unlabelled = params_in(f"stress.originals={folder / 'train' / 'NORMAL'}").stress  # images, no class folders
    with pytest.raises(
        DataError, match=r"^stress\.originals: .*: no NORMAL/ and PNEUMONIA/ folders in it \(or in test/\)$"
    ):
        source.originals_folder(unlabelled)
    assert source.originals_fingerprint(unlabelled)["kind"] == "unreachable"
    missing = params_in("stress.originals=/nowhere").stress
    assert source.originals_fingerprint(missing) == {"originals": "/nowhere", "kind": "unreachable"}
    with pytest.raises(DataError, match=r"^stress\.originals: /nowhere: no such folder$"):
        source.originals_folder(missing)


def test_an_empty_mount_point_is_no_data_set_and_the_last_fingerprint_stays(
    real_subset: Path, tmp_path: Path, params_in: Callable[..., Params]
) -> None:
    """An empty folder at data.local_path (a share not mounted) is an error, not a data set of 0 files that
    would make DVC ingest again (and delete the data) only for ingest to fail; the source stage keeps the
    fingerprint of the data as last ingested, as for a path that is gone."""
    from pipeline.steps import source as source_stage

    mount = tmp_path / "mnt"
    shutil.copytree(real_subset, mount)
    params = params_in("data.source=local", f"data.local_path={mount}")
    stages.run_stage("source", params)
    recorded = Path(params.data.fingerprint).read_text()
    shutil.rmtree(mount)
    mount.mkdir()  # unmounted: the folder is there, empty
    with pytest.raises(DataError, match=rf"^{mount}: empty, no files in it \(data\.local_path\)$"):
        source.fingerprint(params.data)
    kept, line = source_stage.data_fingerprint(params)
    assert (
        "warning" in line
        and "empty, no files in it" in line
        and kept["files"] == len(list(real_subset.rglob("*.jpeg")))
    )
    stages.run_stage("source", params)
    assert Path(params.data.fingerprint).read_text() == recorded


def test_two_data_sets_side_by_side_are_an_error_not_one_dropped(
    real_subset: Path, tmp_path: Path, params_in: Callable[..., Params]
) -> None:
    months = tmp_path / "months"
    shutil.copytree(real_subset, months / "2024-01")
    shutil.copytree(real_subset, months / "2024-02")
    params = params_in("data.source=local", f"data.local_path={months}")
    with pytest.raises(DataError, match=r"2 data sets side by side \(2024-01/, 2024-02/\): point data\.local_path at"):
        ingest.ingest(params.data)
    assert ingest.ingest(params_in("data.source=local", f"data.local_path={months / '2024-02'}").data).total > 0


def test_linked_split_and_class_folders_are_followed_and_a_link_loop_is_not(
    real_subset: Path, tmp_path: Path, params_in: Callable[..., Params]
) -> None:
    """A split or class folder may be a link to where the images are (another disk, a share); ingest and the
    source fingerprint read through it, and a link back up the tree is not walked round and round."""
    store = tmp_path / "store"
    shutil.copytree(real_subset / "train", store / "train")
    tree = tmp_path / "linked"
    shutil.copytree(real_subset, tree, ignore=shutil.ignore_patterns("train"))
    (tree / "train").mkdir()
    (tree / "train" / "NORMAL").symlink_to(store / "train" / "NORMAL", target_is_directory=True)
    (tree / "train" / "PNEUMONIA").symlink_to(store / "train" / "PNEUMONIA", target_is_directory=True)
    (tree / "train" / "PNEUMONIA" / "loop").symlink_to(tree, target_is_directory=True)  # up the tree
    params = params_in("data.source=local", f"data.local_path={tree}")
    result = ingest.ingest(params.data)
    assert dict(result.counts) == _folder_counts(real_subset)
    assert source.fingerprint(params.data)["files"] == len(list(real_subset.rglob("*.jpeg")))


def test_a_zip_with_backslash_paths_imports_and_a_damaged_entry_is_named(
    real_subset: Path, tmp_path: Path, params_in: Callable[..., Params]
) -> None:
    archive = tmp_path / "windows.zip"
    files = sorted(real_subset.rglob("*.jpeg"))
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("chest_xray\\train\\", b"")  # a folder entry, as such tools write them
        for f in files:
            z.write(f, "chest_xray\\" + "\\".join(f.relative_to(real_subset).parts))
    params = params_in("data.source=local", f"data.local_path={archive}")
    result = ingest.ingest(params.data)
    assert dict(result.counts) == _folder_counts(real_subset) and not result.skipped

    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, f"chest_xray/{f.relative_to(real_subset).as_posix()}")
    with zipfile.ZipFile(damaged) as z:
        victim = z.infolist()[3]
    data = bytearray(damaged.read_bytes())
    start = victim.header_offset + 30 + len(victim.filename.encode())  # the entry's compressed bytes
    data[start + 100 : start + 140] = bytes(40)
    damaged.write_bytes(bytes(data))
    before = sorted(p.name for p in Path(params.data.root).rglob("*.jpeg"))
    with pytest.raises(DataError) as err:
        ingest.ingest(params_in("data.source=local", f"data.local_path={damaged}").data)
    assert str(err.value).startswith(f"{damaged}: {victim.filename}: cannot be read (")
    assert sorted(p.name for p in Path(params.data.root).rglob("*.jpeg")) == before  # nothing half-written


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_a_damaged_entry_of_any_compression_is_one_clear_error(
    real_subset: Path, tmp_path: Path, params_in: Callable[..., Params], compression: int
) -> None:
    """Zips re-packed by 7-Zip and the like use bzip2 or LZMA: a damaged entry is a DataError naming it, as for
    deflate, not a traceback."""
    files = sorted(real_subset.rglob("*.jpeg"))[:4]
    damaged = tmp_path / "repacked.zip"
    with zipfile.ZipFile(damaged, "w", compression) as z:
        for f in files:
            z.write(f, f"chest_xray/{f.relative_to(real_subset).as_posix()}")
    with zipfile.ZipFile(damaged) as z:
        victim = z.infolist()[1]
    data = bytearray(damaged.read_bytes())
    start = victim.header_offset + 30 + len(victim.filename.encode())
    data[start + 60 : start + 200] = bytes(range(140))
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        ingest.ingest(params_in("data.source=local", f"data.local_path={damaged}").data)
    assert str(err.value).startswith(f"{damaged}: {victim.filename}: cannot be read (") and "\n" not in str(err.value)


def test_a_weights_file_is_fingerprinted_by_its_bytes_for_the_train_stage(
    tmp_path: Path, params_in: Callable[..., Params]
) -> None:
    """dvc.yaml names the weights file's path only as a param: train depends on its fingerprint instead, so a file
    replaced under the same name trains again, and a copy elsewhere (the same bytes) does not."""
    weights = tmp_path / "start.weights.h5"
    weights.write_bytes(b"first")
    params = params_in(f"model.weights={weights}")
    first = source.weights_fingerprint(params.model)
    assert first["sha256"] == hashlib.sha256(b"first").hexdigest() and first["bytes"] == 5
    weights.write_bytes(b"other")
    assert source.weights_fingerprint(params.model)["sha256"] != first["sha256"]
    assert source.weights_fingerprint(params_in().model) == {"weights": "none"}
    assert source.weights_fingerprint(params_in("model.weights=imagenet").model) == {"weights": "imagenet"}
    assert source.weights_fingerprint(params_in("model.weights=/nowhere.h5").model)["kind"] == "unreachable"
    train = next(s for s in stages.stages(params) if s.name == "train")
    assert params.model.weights_fingerprint in train.data_deps
    src = next(s for s in stages.stages(params) if s.name == "source")
    assert params.model.weights_fingerprint in src.outs and "model.weights" in src.params
