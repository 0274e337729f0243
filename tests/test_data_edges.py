"""Edges of hand-made and hospital folders: nothing is dropped without a word, one image is one label, one child
is one patient, one class folder is read one way, and an unreadable folder is an error."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import Params
from pipeline.core.errors import DataError
from pipeline.data import ingest, source, validation
from pipeline.data.labelled_folders import class_folders


def _tree(root: Path, *files: str) -> Path:
    for f in files:
        path = root / f
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.encode())
    return root


def _import(src: Path, tmp_path: Path) -> ingest.IngestResult:
    result = ingest.IngestResult("local", tmp_path / "out")
    ingest.import_local(src, tmp_path / "out", "train", result)
    return result


def test_validation_and_testing_folders_are_the_val_and_test_splits(tmp_path: Path) -> None:
    src = _tree(
        tmp_path / "src",
        *(f"{split}/{label}/{split}_{label}.jpeg" for split in ("train", "validation", "Testing") for label in "NP"),
    )
    for folder in src.rglob("*"):  # class folders N, P -> NORMAL, PNEUMONIA
        if folder.is_dir() and folder.name in "NP":
            folder.rename(folder.with_name("NORMAL" if folder.name == "N" else "PNEUMONIA"))
    result = _import(src, tmp_path)
    assert dict(result.counts) == {(s, lab): 1 for s in ("train", "val", "test") for lab in ("NORMAL", "PNEUMONIA")}
    assert not result.skipped and not result.nested


def test_val_and_validation_side_by_side_is_an_error(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", "train/NORMAL/a.jpeg", "val/NORMAL/b.jpeg", "validation/NORMAL/c.jpeg")
    with pytest.raises(DataError, match=r"^val/ and validation/: two folders for the val split, keep one$"):
        _import(src, tmp_path)


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (
            ["NORMAL/a.jpeg", "PNEUMONIA/b.jpeg", "test/NORMAL/c.jpeg", "test/PNEUMONIA/d.jpeg"],
            r"^NORMAL/: a class folder outside the train/ val/ test/ folders would be ignored: move it into one of",
        ),
        (
            ["data/train/NORMAL/a.jpeg", "data/extra/PNEUMONIA/b.jpeg"],
            r"^data/extra/PNEUMONIA/: a class folder outside the train/ val/ test/ folders would be ignored",
        ),
        (
            ["train/NORMAL/a.jpeg", "train/PNEUMONIA/bacteria/b.jpeg"],
            r"^train/PNEUMONIA/bacteria/: images below the class folder train/PNEUMONIA/ would be ignored: move",
        ),
        (
            ["NORMAL/a.jpeg", "PNEUMONIA/b.jpeg", "NORMAL/2019/c.JPG"],
            r"^NORMAL/2019/: images below the class folder NORMAL/ would be ignored: move them up into it$",
        ),
    ],
    ids=["flat_beside_splits", "class_folder_in_data_tree", "subtype_subfolders", "year_subfolder"],
)
def test_images_the_layout_would_leave_out_are_a_one_line_error(tmp_path: Path, files: list[str], error: str) -> None:
    with pytest.raises(DataError, match=error):
        _import(_tree(tmp_path / "src", *files), tmp_path)


def test_the_official_quirks_still_import_and_a_nested_copy_is_counted_whatever_it_holds(tmp_path: Path) -> None:
    src = _tree(
        tmp_path / "src",
        "chest_xray/train/NORMAL/a.jpeg",
        "chest_xray/test/PNEUMONIA/b.jpeg",
        "chest_xray/train/NORMAL/Thumbs/notes.txt",  # no image below a class folder: skipped, as before
        "chest_xray/chest_xray/train/NORMAL/a.jpeg",
        "chest_xray/chest_xray/train/NORMAL/old/a.jpeg",  # inside the ignored copy: counted with it
        "chest_xray/chest_xray/NORMAL/x.jpeg",
        "__MACOSX/chest_xray/train/NORMAL/._a.jpeg",
        "chest_xray/.DS_Store",
    )
    result = _import(src, tmp_path)
    assert dict(result.counts) == {("train", "NORMAL"): 1, ("test", "PNEUMONIA"): 1}
    assert result.nested == {"chest_xray/chest_xray": 3}
    assert result.skipped == ["chest_xray/train/NORMAL/Thumbs/notes.txt"]


def test_images_in_a_format_ingest_does_not_import_are_an_error_and_text_alone_is_no_data_set(tmp_path: Path) -> None:
    """A .tif beside the JPEGs would change the class balance unseen; a class folder of notes is not a data set."""
    tif = _tree(tmp_path / "tif", "train/NORMAL/a.jpeg", "train/PNEUMONIA/person1_virus_1.tif")
    with pytest.raises(DataError, match=r"^train/PNEUMONIA/person1_virus_1.tif: .tif images are not imported \("):
        _import(tif, tmp_path)
    notes = _tree(tmp_path / "notes", "train/NORMAL/readme.txt", "train/PNEUMONIA/labels.csv")
    with pytest.raises(DataError, match=r"^no images in a \{train,val,test\}/\{NORMAL,PNEUMONIA\}/"):
        _import(notes, tmp_path)
    training = _tree(tmp_path / "export", "Training/NORMAL/a.jpeg", "Testing/PNEUMONIA/b.jpeg")  # a hospital's names
    assert dict(_import(training, tmp_path / "t").counts) == {("train", "NORMAL"): 1, ("test", "PNEUMONIA"): 1}


def test_a_full_disk_names_the_target_not_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import shutil

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    src = _tree(tmp_path / "src", "train/NORMAL/a.jpeg")
    with pytest.raises(DataError, match=rf"^{tmp_path}: cannot write the images \(No space left on device\)$"):
        _import(src, tmp_path)


def test_names_differing_only_in_case_are_one_file_not_two_counted(tmp_path: Path) -> None:
    """On macOS and Windows b.JPEG and B.jpeg are one file: the second would overwrite the first."""
    src = _tree(tmp_path / "src", "train/NORMAL/B.jpeg", "train/NORMAL/b.JPEG", "train/PNEUMONIA/c.jpeg")
    result = _import(src, tmp_path)
    assert result.counts[("train", "NORMAL")] == 1 and result.skipped == ["train/NORMAL/b.JPEG"]


def test_one_image_under_two_labels_fails_validation_naming_both(params_in: Callable[..., Params]) -> None:
    params = params_in("validation.min_images_per_class={train: 0, val: 0, test: 0}")
    row = {"official_split": "train", "split": "train", "subtype": "none", "width": 224, "height": 224}
    row |= {"mode": "L", "bytes": 10, "decodable": True, "error": ""}
    index = pd.DataFrame(
        [
            {**row, "path": "train/NORMAL/IM-0001-0001.jpeg", "label": "NORMAL", "patient_id": "train/IM-0001",
             "sha256": "a"},
            {**row, "path": "train/PNEUMONIA/person1_bacteria_1.jpeg", "label": "PNEUMONIA", "subtype": "bacteria",
             "patient_id": "train/person1", "sha256": "a"},
            {**row, "path": "train/NORMAL/IM-0002-0001.jpeg", "label": "NORMAL", "patient_id": "train/IM-0002",
             "sha256": "b"},
        ]
    )  # fmt: skip
    report = validation.validate(index, params.validation)
    check = next(c for c in report.checks if c.check == "no image (sha256) under two labels")
    assert not check.success and check.unexpected == 2
    assert check.examples == ["train/NORMAL/IM-0001-0001.jpeg", "train/PNEUMONIA/person1_bacteria_1.jpeg"]
    assert next(c for c in report.checks if c.check == "no image (sha256) in two splits").success


def test_two_case_variants_of_a_class_folder_are_an_error_naming_both(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "originals", "NORMAL/a.jpeg", "normal/b.jpeg", "PNEUMONIA/c.jpeg")
    with pytest.raises(DataError, match=rf"^{folder}: both NORMAL/ and normal/, which one holds the NORMAL images"):
        class_folders(folder)
    assert class_folders(_tree(tmp_path / "one", "normal/a.jpeg", "Pneumonia/b.jpeg")) is not None


@pytest.fixture
def unlistable(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Makes a folder fail to list as a share or a folder without read permission does (tests run as root)."""

    def make(folder: Path) -> None:
        real = os.scandir

        def scandir(path: str | int | Path = ".") -> Iterator[os.DirEntry[str]]:
            if not isinstance(path, int) and Path(path) == folder:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)

    return make


def test_an_unreadable_folder_is_an_error_and_a_broken_link_is_still_left_out(
    tmp_path: Path, params_in: Callable[..., Params], unlistable: Callable[[Path], None]
) -> None:
    src = _tree(tmp_path / "src", "train/NORMAL/a.jpeg", "test/NORMAL/b.jpeg", "test/PNEUMONIA/c.jpeg")
    (src / "train" / "PNEUMONIA").symlink_to(tmp_path / "dead-mount", target_is_directory=True)
    params = params_in("data.source=local", f"data.local_path={src}").data
    assert source.fingerprint(params)["files"] == 3  # the broken link: left out, as before
    unlistable(src / "test" / "PNEUMONIA")
    error = rf"^{src}/test/PNEUMONIA: cannot be listed \(Permission denied\)$"
    with pytest.raises(DataError, match=error):
        source.fingerprint(params)
    with pytest.raises(DataError, match=error):
        ingest.ingest(params)
