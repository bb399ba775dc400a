"""`dhr import`: CAMs / features / masks written by other tools, into a dhr store."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dhr_cli.config import MAX_PIXELS
from dhr_cli.cli.options import (
    MaxPixels,
    DataRoot,
    MissingItems,
    OutStore,
    Overwrite,
    Quiet,
    Resume,
    SkipMissingImages,
    Split,
    app,
    out,
    user_errors,
)
from dhr_cli.pipeline.imports import FORMATS

# The formats `run_import` knows, as a Typer choice: a bad FORMAT is a usage error listed in --help.
ImportFormat = enum.Enum("ImportFormat", {name: name for name in (*FORMATS, "labels")}, type=str)


@app.command("import", help=(
    "Convert another tool's per-image files in SRC into a store: irn, mctformer, clip-es ({id}.npy CAM "
    "dicts -> cams store), dhr-pt ({id}.pt float16 (C,h,w) USS features -> features store), png (label PNGs -> "
    "masks store). The .npy dicts are Python pickles: they are read by a restricted unpickler that rebuilds only "
    "NumPy arrays and torch tensors (no code from the file runs); --trust-files reads them with "
    "np.load(allow_pickle=True) instead, which can run code: only for files you trust. "
    "0-based class keys become label key+1 when class 0 is background. FORMAT labels: SRC is an IRN "
    "cls_labels.npy or ToCo cls_labels_onehot.npy file and OUT a labels.json of image-level labels "
    "({id: [class names]}) for the split's images, the file the flat layout reads as ROOT/labels.json."))
@user_errors
def import_cmd(
    fmt: Annotated[ImportFormat, typer.Argument(metavar="FORMAT", help="The tool that wrote SRC (labels: an image-level label file).")],
    src: Annotated[Path, typer.Argument(metavar="SRC", help="Folder with one file per image id (labels: the .npy label file).")],
    data: DataRoot,
    out_path: OutStore,
    split: Split = None,
    skip_missing_images: SkipMissingImages = False,
    source: Annotated[Optional[str], typer.Option("--source", help="dhr-pt: name recorded as the features' source (e.g. stego, cause).")] = None,
    missing: MissingItems = "fail",
    trust_files: Annotated[bool, typer.Option("--trust-files", help=(
        "Read the .npy pickles with np.load(allow_pickle=True): runs code from the files; only for files you trust."))] = False,
    overwrite: Overwrite = False,
    resume: Resume = False,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.outputs import check_output
    from dhr_cli.pipeline.imports import run_import

    fmt = ImportFormat(fmt).value
    if fmt == "labels":
        from dhr_cli.io.progress import output_written_whole

        output_written_whole()  # a stop advises a plain rerun, not the --resume of the other formats
    check_output(out_path, overwrite=overwrite, resume=resume,  # before any work: the shared output check
                 resumable=fmt != "labels", inputs={"SRC": src, "--data": data})  # a labels.json is written whole

    ds = open_dataset(data, split)
    if fmt == "labels":
        from dhr_cli.pipeline.imports import run_import_labels

        s = run_import_labels(src, ds, out_path, overwrite=overwrite, missing=missing, trust=trust_files)
        out.print(f"labels {out_path}: {s['written']} images from {s['keys']} entries of {src}"
                  + (f"; {len(s['missing'])} images without labels left out: {', '.join(s['missing'][:5])}"
                     if s["missing"] else ""), markup=False, soft_wrap=True)
        return
    prov = make_provenance("import", {"format": fmt, "missing": missing, "source": source},
                           inputs={"src": src, "data": data}, dataset=ds, ids=ds.ids)  # a --resume: same split
    s = run_import(fmt, src, ds, out_path, provenance=prov, overwrite=overwrite, resume=resume, quiet=quiet,
                   source_name=source, missing=missing, trust=trust_files)
    out.print(f"{s['kind']} store {out_path}: {s['written']} images imported"
              + (f"; {len(s['missing'])} missing: {', '.join(s['missing'][:5])}" if s["missing"] else ""), markup=False, soft_wrap=True)
