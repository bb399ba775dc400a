"""A new user's real-photo quirks (the user-journey audit): EXIF-rotated JPEGs, truncated files.

dhr reads images as stored (no EXIF rotation, as PIL and the WSSS codebases do); a mask or a COCO json
drawn on the displayed (turned) image is refused in one line that says so, never scored rotated.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import open_dataset
from tests.helpers import save_palette_png

_runner = CliRunner()
H, W = 24, 32  # the displayed (upright) size; the file stores the image turned, 32 rows x 24 columns


def _exif_jpeg(path: Path, orientation: int = 6) -> None:
    """An upright H x W photo saved turned by 90 degrees with the EXIF tag that shows it upright."""
    upright = np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(upright).transpose(Image.ROTATE_90).save(path, quality=95, exif=exif)


def _voc(root: Path, mask_hw: tuple[int, int]) -> Path:
    for sub in ("SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    _exif_jpeg(root / "JPEGImages" / "IMG_0001.rot.jpg")
    mask = np.zeros(mask_hw, np.uint8)
    mask[4:12, 4:12] = 8  # cat
    save_palette_png(root / "SegmentationClass" / "IMG_0001.rot.png", mask)
    (root / "Annotations" / "IMG_0001.rot.xml").write_text(
        "<annotation><object><name>cat</name></object></annotation>")
    (root / "ImageSets/Segmentation/train.txt").write_text("IMG_0001.rot\n")
    return root


def _pred_dir(tmp: Path, hw: tuple[int, int]) -> Path:
    d = tmp / "pred"
    d.mkdir()
    Image.fromarray(np.zeros(hw, np.uint8)).save(d / "IMG_0001.rot.png")
    return d


def _one_line_error(args: list[str], named: str) -> str:
    r = _runner.invoke(app, args + ["-q"])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # no traceback
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in lines[0], r.output
    return lines[0]


def test_mask_drawn_on_the_displayed_exif_image_says_so(tmp_path):
    root = _voc(tmp_path / "VOC2012", mask_hw=(H, W))  # mask in display orientation, image stored turned
    line = _one_line_error(["eval", "--pred", str(_pred_dir(tmp_path, (W, H))), "--data", str(root),
                            "--split", "train"], "IMG_0001.rot.png")
    assert f"mask is {W}x{H} but its image is {H}x{W} as stored" in line
    assert "EXIF orientation 6" in line and "IMG_0001.rot.jpg" in line


def test_mask_in_the_stored_orientation_is_read(tmp_path):
    root = _voc(tmp_path / "VOC2012", mask_hw=(W, H))
    ds = open_dataset(root, "train")
    assert ds.image_size("IMG_0001.rot") == (W, H) == ds.image("IMG_0001.rot").shape[:2]
    assert ds.gt("IMG_0001.rot").shape == (W, H)
    r = _runner.invoke(app, ["eval", "--pred", str(_pred_dir(tmp_path, (W, H))), "--data", str(root),
                             "--split", "train", "-q"])
    assert r.exit_code == 0, r.output


def test_plain_size_mismatch_has_no_exif_hint(tmp_path):
    root = _voc(tmp_path / "VOC2012", mask_hw=(W, H + 1))
    with pytest.raises(DatasetError, match=r"mask is 25x32 but its image is 24x32$"):
        open_dataset(root, "train").gt("IMG_0001.rot")


@pytest.mark.parametrize("json_hw, hint", [((H, W), True), ((W + 1, H), False)])
def test_coco_json_size_must_be_the_files(tmp_path, json_hw, hint):
    pytest.importorskip("pycocotools")
    root = tmp_path / "coco"
    name = "COCO_train2014_000000000001.jpg"
    _exif_jpeg(root / "train2014" / name)
    (root / "annotations").mkdir(parents=True)
    js = root / "annotations" / "instances_train2014.json"
    js.write_text(json.dumps({
        "images": [{"id": 1, "file_name": name, "height": json_hw[0], "width": json_hw[1]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}],
        "categories": [{"id": 1, "name": "person"}]}))
    ds = open_dataset(root, "train2014")
    with pytest.raises(DatasetError) as e:
        ds.gt(ds.ids[0])
    msg = str(e.value)
    assert msg.startswith(str(js)) and f"{name} is {json_hw[1]}x{json_hw[0]} in the json but {H}x{W} in its file" in msg
    assert ("EXIF orientation 6" in msg) == hint and "\n" not in msg


def test_truncated_jpeg_is_named_as_truncated(tmp_path):
    root = _voc(tmp_path / "VOC2012", mask_hw=(W, H))
    p = root / "JPEGImages" / "IMG_0001.rot.jpg"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"IMG_0001\.rot\.jpg: cannot decode image: the file is truncated \(OSError\)$"):
        open_dataset(root, "train").image("IMG_0001.rot")


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from tests.helpers import make_flat

    root = make_flat(tmp_path / "flat")
    ramp = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    Image.fromarray(ramp).save(root / "images" / "a.png")  # mode I;16: PIL's convert("RGB") makes it ~all white
    image = open_dataset(root).image("a")
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], (ramp >> 8).astype(np.uint8)) and abs(image.mean() - 127.5) < 2


def test_a_1x1_image_reaches_torch_writable(tmp_path):
    """np.asarray(PIL image) is read-only; torch warned on stderr ("The given NumPy array is not writable")
    in `dhr seed` / `dhr propagate` when the transpose needed no copy (a 1x1 image)."""
    from dhr_cli.pipeline.inputs import image_tensor
    from tests.helpers import make_flat

    root = make_flat(tmp_path / "flat")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "images" / "a.png")
    Image.new("L", (1, 1), 1).save(root / "masks" / "a.png")
    image = image_tensor(open_dataset(root), "a")
    assert image.shape == (3, 1, 1) and image.flags.writeable and image.ravel().tolist() == [10, 20, 30]


def test_import_png_of_a_displayed_exif_image_says_so(tmp_path):
    root = _voc(tmp_path / "VOC2012", mask_hw=(W, H))
    line = _one_line_error(["import", "png", str(_pred_dir(tmp_path, (H, W))), "--data", str(root), "--split", "train",
                            "--out", str(tmp_path / "m.h5")], "IMG_0001.rot.png")
    assert f"mask is {W}x{H} but its image is {H}x{W} as stored" in line and "EXIF orientation 6" in line


def test_info_names_images_with_an_exif_orientation(tmp_path):
    """Orientations 2-4 (mirror, 180 degrees) and square photos keep their size: no size check can catch a
    mask drawn on the displayed image, so `dhr info ROOT` (the README's first step) says which images are tagged."""
    root = _voc(tmp_path / "VOC2012", mask_hw=(W, H))
    r = _runner.invoke(app, ["info", str(root), "--split", "train", "--json"])
    assert r.exit_code == 0, r.output
    assert "IMG_0001.rot.jpg" in json.loads(r.stdout)["exif_orientation"]
    from tests.helpers import make_flat

    r = _runner.invoke(app, ["info", str(make_flat(tmp_path / "flat")), "--json"])
    assert r.exit_code == 0 and "exif_orientation" not in json.loads(r.stdout)
