"""Existing image sets read by key: a folder of image files and/or tar sets, and an optional id mapping.

Layout (docs/synthesize.md, "Importing images"):

    ROOT/                      any depth; every image file and every member of every *.tar
      000123.jpg               key "000123"       (the file name without its suffix)
      part-01/000124.png       key "000124"       (folders only organise: a key is unique in the set)
      sets/00000.tar           members "000125.jpg", ... -> keys "000125", ...

    MAPPING.csv (optional)     header `caption_id,image`; `image` is a key, or a path under ROOT (a tar
                               member name) with its suffix.
                               Without a mapping, the image of caption `c` is the one whose key is `c`.

The index reads names and sizes only (tar headers, no image bytes); its digest (every key, its
source and size) goes into the synthesize fingerprint, so a changed set is a different stage.
Only regular files inside the root are read: a FIFO, a device, or a link that leads out of the root
is indexed as refused (its caption gets a failed row, never a hang or a read elsewhere), and an image
over `read`'s size cap is refused before a byte of it is read. A root that is no data set (the file
system's root, a home folder, a system folder) is refused before it is walked.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Roots whose walk would read a whole machine rather than a data set.
NOT_A_DATA_SET = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/root", "/run", "/sbin", "/sys", "/usr",
                  "/var")


@dataclass(frozen=True)
class Entry:
    """Where one image's bytes are: a file, or a byte range of a tar."""

    source: str          # path relative to the root (the file, or the tar holding it)
    member: str | None   # tar member name; None for a plain file
    offset: int          # byte offset of the data (0 for a plain file)
    size: int
    refused: str | None = None   # why it is never read (not a regular file, a link out of the root)


def _key(name: str) -> str:
    p = PurePosixPath(name)
    return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else ""


class ImageIndex:
    """Every image under `root` by key; `read(key)` returns its bytes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"imported images {root}: no such directory")
        if str(self.root) in NOT_A_DATA_SET or self.root == Path.home().resolve():
            raise ValueError(f"imported images {root}: {self.root} is no image set (a system or home folder); give the "
                             "folder that holds the images")
        self.entries: dict[str, Entry] = {}
        self.by_name: dict[str, str] = {}   # path with its suffix -> key
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(self.root).as_posix()
                key = _key(rel)
                if not key and not name.lower().endswith(".tar"):
                    continue
                if why := self._refusal(path):
                    if key:
                        self._add(key, rel, Entry(rel, None, 0, 0, refused=why))
                elif name.lower().endswith(".tar"):
                    self._add_tar(path, rel)
                else:
                    self._add(key, rel, Entry(rel, None, 0, path.stat().st_size))
        if not self.entries:
            raise ValueError(f"imported images {self.root}: no image files ({', '.join(IMAGE_SUFFIXES)}) "
                             "and no tar members with those suffixes")

    def _refusal(self, path: Path) -> str | None:
        """Why a file of the walk must not be read: a link out of the root, or not a regular file."""
        if path.is_symlink() and not path.resolve().is_relative_to(self.root):
            return f"a link to {path.resolve()}, outside the imported set {self.root}"
        try:
            mode = path.stat().st_mode
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        return None if stat.S_ISREG(mode) else "not a regular file (a FIFO, device or socket)"

    def _add(self, key: str, name: str, entry: Entry) -> None:
        if key in self.entries:
            old = self.entries[key]
            raise ValueError(f"imported images {self.root}: key {key!r} is both {old.source}:{old.member or ''} "
                             f"and {entry.source}:{entry.member or ''}; keep one image per key")
        self.entries[key] = entry
        self.by_name[name] = key

    def _add_tar(self, path: Path, rel: str) -> None:
        try:
            with tarfile.open(path, "r:") as tar:   # uncompressed tars: members are byte ranges
                for m in tar:
                    if m.isfile() and (key := _key(m.name)):
                        self._add(key, m.name, Entry(rel, m.name, m.offset_data, m.size))
        except tarfile.TarError as e:
            raise ValueError(f"imported images: {path} is not a readable uncompressed tar ({e})") from None

    def resolve(self, image: str) -> str | None:
        """The key of `image` (a key, or a path/member name with its suffix), or None."""
        return image if image in self.entries else self.by_name.get(image)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The image's bytes; an OSError for a refused entry, or one over `max_bytes`, before anything is read."""
        e = self.entries[key]
        if e.refused:
            raise OSError(f"{self.root / e.source}: {e.refused}")
        if max_bytes is not None and e.size > max_bytes:
            raise OSError(f"{self.root / e.source}{':' + e.member if e.member else ''}: {e.size} bytes, over the "
                          f"cap of {max_bytes} (synthesize.imported_max_bytes)")
        with open(self.root / e.source, "rb") as f:
            f.seek(e.offset)
            data = f.read(e.size)
        if len(data) != e.size:
            raise OSError(f"{self.root / e.source}: {e.member or 'file'} is truncated ({len(data)} of {e.size} bytes)")
        return data

    def describe(self, key: str) -> str:
        e = self.entries[key]
        return f"{e.source}:{e.member}" if e.member else e.source

    def digest(self) -> str:
        """sha256 over every (key, source, member, size): what the set holds, without reading images."""
        h = hashlib.sha256()
        for key in sorted(self.entries):
            e = self.entries[key]
            h.update(f"{key}\t{e.source}\t{e.member or ''}\t{e.size}\n".encode())
            if e.refused:
                h.update(f"refused\t{e.refused}\n".encode())
        return h.hexdigest()


def read_mapping(path: str | os.PathLike) -> dict[str, str]:
    """caption_id -> image from a CSV with the header `caption_id,image`; errors name the file and the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"imported mapping {path}: not found; give a CSV with the header caption_id,image")
    if not path.is_file():  # a FIFO would block the read forever, a device may never end
        raise ValueError(f"imported mapping {path}: not a regular file; give a CSV with the header caption_id,image")
    out: dict[str, str] = {}
    start = 1
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, strict=True)  # strict: text after a closing quote ("a"b.jpg) is an error
            header = [h.strip() for h in next(reader, [])]
            if not {"caption_id", "image"} <= set(header):
                raise ValueError(f"{path}: the header must name the columns caption_id and image (got {header})")
            if repeated := sorted({h for h in header if h and header.count(h) > 1}):
                raise ValueError(f"{path}: line 1: duplicate column names in the header: {repeated}; which one is "
                                 "meant is unclear")
            c, i = header.index("caption_id"), header.index("image")
            while True:
                start = reader.line_num + 1
                record = next(reader, None)
                if record is None:
                    return out
                if reader.line_num != start:  # no cell of a mapping spans lines: a quote opened and never closed
                    raise ValueError(f"{path}:{start}: a quoted cell starting on this line runs to line "
                                     f"{reader.line_num}: a stray or unclosed quote")
                if not record:
                    continue
                cid = record[c].strip() if c < len(record) else ""
                image = record[i].strip() if i < len(record) else ""
                if not cid or not image:
                    raise ValueError(f"{path}:{start}: empty caption_id or image")
                if cid in out:
                    raise ValueError(f"{path}:{start}: caption_id {cid!r} is mapped twice")
                out[cid] = image
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the mapping as UTF-8") from None
    except csv.Error as e:  # e.g. a cell over csv's field size limit (128 KiB): a stray quote swallowing the file
        if str(e) == "unexpected end of data":  # strict mode's word for a quote still open at the end
            raise ValueError(f"{path}:{start}: a quoted cell starting on this line runs to line {reader.line_num}: "
                             "a stray or unclosed quote") from None
        raise ValueError(f"{path}:{start}: invalid CSV ({e}); a caption_id,image mapping has short cells") from None
