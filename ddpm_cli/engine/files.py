"""Atomic file writing: a crash at any moment leaves either the old file or the new one, never a half-written one;
and telling a file that was cut short (a copy or download interrupted) from one of another kind."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems cannot open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def utf8_name(path: Path) -> bool:
    """Whether the path is valid UTF-8, as safetensors, ONNX and torch.export need of a path they open (a name that
    is not reaches Python as surrogate escapes: a Latin-1 name on a UTF-8 system)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def temp_beside(path: Path, suffix: str = "") -> Path:
    """The temporary name of an atomic write of `path`: `.<name>.tmp-<pid><suffix>` in the same folder, the name made
    valid UTF-8 (the libraries that write it take no other path; the final rename is the system's, which takes
    any)."""
    return path.with_name(f".{as_utf8(path.name)}.tmp-{os.getpid()}{suffix}")


def as_utf8(name: str) -> str:
    """`name` as valid UTF-8 text: the bytes of it that are not become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, flush and fsync, then rename into place."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_writable(paths: list[Path], fix: str) -> None:
    """Each path's folder can take a file, or DdpmError naming the path, why, and `fix`: an output that cannot be
    written fails before the work, not after it. Folders made for the probe are taken away again (a command that
    then fails for another reason leaves none behind)."""
    import tempfile

    from ddpm_cli.errors import DdpmError

    for p in paths:
        made = [d for d in (p.parent, *p.parent.parents) if not d.exists()]  # deepest first
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=p.parent, prefix=".ddpm-probe-"):
                pass
        except OSError as e:
            raise DdpmError(f"cannot write {p} ({e.strerror or e}); {fix}") from None
        finally:
            for d in made:
                try:
                    d.rmdir()
                except OSError:
                    break  # not made by us after all, or no longer empty


def zip_cut_short(path: Path) -> bool:
    """A zip (a .zip of images, an .npz) cut short: it opens as a zip does (a local file header, PK 03 04) but its
    end, the central directory zipfile reads first, is missing, so zipfile.is_zipfile calls it no zip at all."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
        return not zipfile.is_zipfile(path)
    except OSError:
        return False


def cut_short_message(label: str) -> str:
    """The one line for a zip_cut_short file, named `label` (e.g. "data.root images.zip")."""
    return (f"{label} is a damaged zip: it was cut short (its end, the zip's table of contents, is missing); copy "
            f"it again")
