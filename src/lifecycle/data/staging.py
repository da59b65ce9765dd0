"""Dataset folders written once: built in a staging sibling, renamed into place, reused when complete."""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_once(out_dir: str | os.PathLike, manifest: str, params: dict, write: Callable[[Path], None]) -> dict:
    """The contents of `out_dir/manifest`, writing the folder first unless a complete one with `params` exists.

    `write(staging)` fills a staging sibling and writes `manifest` (a json object holding `params`) last; the
    folder is then renamed into place. If another process finishes the same folder first, theirs is used.
    Raises ValueError when `out_dir` holds a folder written with other params, FileExistsError when it holds
    other files.
    """
    out = Path(out_dir)

    def existing() -> dict | None:
        if not (out / manifest).is_file():
            return None
        recorded = json.loads((out / manifest).read_text())
        built_with = {key: recorded.get(key) for key in params}
        if built_with != params:
            raise ValueError(f"{out} holds data built with {built_with}, not {params}; "
                             "delete it or choose another folder")
        return recorded

    if (done := existing()) is not None:
        return done
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no {manifest}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp creates it private
        try:
            if out.exists():
                out.rmdir()  # empty (checked above)
            staging.rename(out)
        except OSError:
            if (done := existing()) is None:  # not another process's finished copy
                raise
            return done
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return json.loads((out / manifest).read_text())
