"""`jaxdl finetune` on a flat folder: classes from file names (--labels-from-name) or a CSV (--labels-csv)."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from jaxdl import cli
from jaxdl.data import images
from jaxdl.models.saving import read_model

CAT_PATTERN = r"^([fm])\d+"


@pytest.fixture(autouse=True)
def session_compilation_cache(monkeypatch):
    """`main` would point JAX's compilation cache at $JAXDL_CACHE for the rest of the session: keep the suite's."""
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)


def photos(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / name)
    return folder


def flat_cats(tmp_path):
    return photos(tmp_path / "cats", "m02.jpg", "f01.jpg", "m01.png", "f02.jpg", "f10.jpeg")


def test_labels_from_names_takes_each_class_from_the_regex_group(tmp_path):
    data = flat_cats(tmp_path)
    (data / "notes.txt").write_text("not an image: not labelled, not an error")
    photos(data / "extra", "x.jpg")  # subfolders are not read
    (data / ".hidden.jpg").write_text("")
    paths, labels, classes = images.labels_from_names(data, CAT_PATTERN)
    assert [p.name for p in paths] == ["f01.jpg", "f02.jpg", "f10.jpeg", "m01.png", "m02.jpg"]
    assert all(p.parent == data for p in paths)
    assert classes == ["f", "m"]  # sorted alphabetically
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])
    assert labels.dtype == np.int32
    # Searched, not matched at the start: an unanchored pattern finds the class anywhere in the name.
    _, labels, classes = images.labels_from_names(photos(tmp_path / "b", "a_cat.jpg", "a_dog.jpg", "b_cat.jpg"),
                                                  r"_(cat|dog)\.")
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 1, 0]


def test_labels_from_names_refuses_unmatched_images_listing_how_many_and_the_first_few(tmp_path):
    data = photos(flat_cats(tmp_path), *[f"x{i}.jpg" for i in range(7)])
    with pytest.raises(ValueError) as error:
        images.labels_from_names(data, CAT_PATTERN)
    assert str(error.value) == (f"{data}: 7 of 12 images have names that '^([fm])\\d+' does not match "
                                "(or whose group is empty): x0.jpg, x1.jpg, x2.jpg, x3.jpg, x4.jpg, ...")
    with pytest.raises(ValueError, match=r"2 of 6 images .*: f\.jpg, m\.jpg$"):
        images.labels_from_names(photos(tmp_path / "two", "f.jpg", "m.jpg", "f1.jpg", "f2.jpg", "m1.jpg", "m2.jpg"),
                                 r"^([fm])(?=\d)")


@pytest.mark.parametrize("pattern, message", [
    (r"^[fm]\d+", "has 0 groups; it needs exactly one, whose value is the class name"),
    (r"^([fm])(\d+)", "has 2 groups; it needs exactly one"),
    (r"^([fm]\d+", "invalid regular expression '^([fm]\\d+': missing ), unterminated subpattern"),
])
def test_a_pattern_without_exactly_one_group_is_refused(tmp_path, pattern, message, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        images.labels_from_names(flat_cats(tmp_path), pattern)
    with pytest.raises(SystemExit) as stopped:  # the command refuses it before reading anything
        cli.main(["finetune", str(tmp_path / "cats"), "--out", str(tmp_path / "m"), "--labels-from-name", pattern])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "argument --labels-from-name: " in err and message in err


def test_labels_from_names_needs_two_classes_and_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"cats: needs at least two classes, found 1 \(f\)"):
        images.labels_from_names(photos(tmp_path / "cats", "f01.jpg", "f02.jpg"), CAT_PATTERN)
    with pytest.raises(FileNotFoundError, match="nowhere: no such data folder"):
        images.labels_from_names(tmp_path / "nowhere", CAT_PATTERN)
    with pytest.raises(ValueError, match=r"empty: no images \(.jpg"):
        images.labels_from_names(photos(tmp_path / "empty"), CAT_PATTERN)


def write_csv(path, text, encoding="utf-8"):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding=encoding)
    return path


def test_labels_from_csv_reads_file_and_class_with_or_without_a_header(tmp_path):
    data = photos(flat_cats(tmp_path), "more/f20.jpg")
    body = "m02.jpg,male\nf01.jpg, female\n\nm01.png,male\n./more/f20.jpg,female\n"
    with_header = write_csv(tmp_path / "labels.csv", "file,sex\n" + body, encoding="utf-8-sig")  # Excel's BOM
    without = write_csv(tmp_path / "plain.csv", body)
    for csv_file in (with_header, without):
        paths, labels, classes = images.labels_from_csv(data, csv_file)
        assert [p.relative_to(data).as_posix() for p in paths] == ["f01.jpg", "m01.png", "m02.jpg", "more/f20.jpg"]
        assert classes == ["female", "male"]
        assert labels.tolist() == [0, 1, 1, 0] and labels.dtype == np.int32
    # f02.jpg and f10.jpeg are in the folder but not in the CSV: not used.


@pytest.mark.parametrize("text, message", [
    ("file,class\nf01.jpg,female\nm09.jpg,male\n", "line 3: 'm09.jpg': no such file in "),
    ("f01.jpg,female\nm01.png,male\nf01.jpg,male\n", "line 3: 'f01.jpg' is listed twice (first on line 1)"),
    ("f01.jpg,female\n./f01.jpg,female\n", "line 2: './f01.jpg' is listed twice (first on line 1)"),
    ("f01.jpg,female\n../m01.png,male\n", "line 2: '../m01.png' is not a path inside "),
    ("f01.jpg,female\n/etc/passwd.jpg,male\n", "line 2: '/etc/passwd.jpg' is not a path inside "),
    ("f01.jpg,female\nnotes.txt,male\n", "line 2: 'notes.txt' is not an image file (.jpg"),
    ("f01.jpg,female\nm01.png\n", "line 2: expected two non-empty columns (file,class), got ['m01.png']"),
    ("f01.jpg;female\nm01.png;male\n", "line 1: expected two non-empty columns (file,class), got ['f01.jpg;female']"),
    ("f01.jpg,female\nm01.png,\n", "line 2: expected two non-empty columns (file,class), got ['m01.png', '']"),
    ("f01.jpg,female,2\n", "line 1: expected two non-empty columns (file,class), got ['f01.jpg', 'female', '2']"),
    ("f01.jpg,female\nf02.jpg,female\n", "needs at least two classes, found 1 (female)"),
    ("file,class\n\n", "no labelled images (expected lines of file,class)"),
    ('f01.jpg,female\n"m01.png",\n', "line 2: expected two non-empty columns (file,class), got ['m01.png', '']"),
    ('f01.jpg,"fe\nmale"\n.,male\n', "line 3: '.' is not an image file"),  # a quoted field across two lines
    ("f01.jpg,female\n".encode("utf-16"), "not a readable UTF-8 CSV file ("),
])
def test_labels_csv_errors_name_the_line(tmp_path, text, message):
    data = flat_cats(tmp_path)
    (data / "notes.txt").write_text("")
    csv_file = write_csv(tmp_path / "labels.csv", text)
    with pytest.raises(ValueError) as error:
        images.labels_from_csv(data, csv_file)
    assert message in str(error.value)
    if message.startswith("line "):
        assert str(error.value).startswith(f"{csv_file}, line ")


def test_a_missing_labels_file_or_data_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv: no such labels file"):
        images.labels_from_csv(flat_cats(tmp_path), tmp_path / "nothing.csv")
    with pytest.raises(FileNotFoundError, match="nowhere: no such data folder"):
        images.labels_from_csv(tmp_path / "nowhere", write_csv(tmp_path / "l.csv", "f01.jpg,female\n"))


def test_the_command_reports_labelling_errors_before_loading_any_weights(tmp_path, capsys):
    data = photos(flat_cats(tmp_path), "cat.jpg")
    code = cli.main(["finetune", str(data), "--out", str(tmp_path / "m"), "--labels-from-name", CAT_PATTERN])
    assert code == 1
    assert capsys.readouterr().err == (f"jaxdl finetune: {data}: 1 of 6 images have names that "
                                       "'^([fm])\\d+' does not match (or whose group is empty): cat.jpg\n")
    csv_file = write_csv(tmp_path / "labels.csv", "f01.jpg,female\nm07.jpg,male\n")
    assert cli.main(["finetune", str(data), "--out", str(tmp_path / "m"), "--labels-csv", str(csv_file)]) == 1
    assert capsys.readouterr().err.startswith(f"jaxdl finetune: {csv_file}, line 2: 'm07.jpg': no such file")
    assert cli.main(["finetune", str(data), "--out", str(tmp_path / "m")]) == 1  # subfolders stay the default
    assert "needs one subfolder per class" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_the_two_labelling_options_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["finetune", str(tmp_path), "--out", str(tmp_path / "m"), "--labels-from-name", CAT_PATTERN,
                  "--labels-csv", "labels.csv"])
    assert stopped.value.code == 2
    assert "argument --labels-csv: not allowed with argument --labels-from-name" in capsys.readouterr().err


@pytest.mark.requires_cats
def test_finetune_labels_a_flat_folder_by_name_and_writes_the_history_and_its_figures(tmp_path, jaxdl_cache, capsys):
    from tests.conftest import CATS

    out = tmp_path / "cats-model"
    arguments = ["finetune", str(CATS), "--labels-from-name", CAT_PATTERN, "--out", str(out), "--epochs", "1",
                 "--batch-size", "40", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    code = cli.main(arguments)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]  # ids count batches seen: 1 an epoch
    assert cli.main(arguments + ["--overwrite"]) == 1  # the directory holds a run: resumed only when asked
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err
    lines = printed.out.splitlines()
    assert lines[0] == "40 training images, 0 validation, classes ['f', 'm']"
    assert lines[1].startswith("epoch 1/1: loss ") and "accuracy" in lines[1]
    figures = [out.absolute() / "history.png", out.absolute() / "confusion_matrix.png"]
    assert lines[-3:] == [f"history: {out.absolute() / 'history.json'}", f"figures: {figures[0]}, {figures[1]}",
                          f"saved to {out.absolute()}"]
    for figure in figures:  # PNG files of a figure's size (dpi 100), not empty ones
        with Image.open(figure) as image:
            assert image.format == "PNG" and min(image.size) >= 300
    history = json.loads((out / "history.json").read_text())
    assert list(history) == ["loss", "accuracy"] and len(history["loss"]) == 1
    _, metadata = read_model(out)
    assert metadata["classes"] == ["f", "m"] and metadata["history"] == history


def test_a_flat_folder_without_a_labels_option_is_told_which_options_label_it(tmp_path, capsys):
    data = flat_cats(tmp_path)
    assert cli.main(["finetune", str(data), "--out", str(tmp_path / "m")]) == 1
    assert capsys.readouterr().err == (
        f"jaxdl finetune: {data}: needs one subfolder per class and at least two classes, found 0; it holds 5 "
        "images directly (a flat folder): take each image's class from its file name (--labels-from-name REGEX, "
        "images.labels_from_names) or from a CSV file of 'file,class' lines (--labels-csv FILE, "
        "images.labels_from_csv)\n")
    assert not (tmp_path / "m").exists()
    photos(data / "extra", "x.jpg")  # one subfolder beside the images: still a flat folder to label
    with pytest.raises(ValueError, match=r"found 1 \(extra\); it holds 5 images directly .*--labels-from-name REGEX"):
        images.image_folder(data)
    with pytest.raises(ValueError, match=r"found 0$"):  # no images at all: nothing to suggest
        images.image_folder(photos(tmp_path / "empty"))
