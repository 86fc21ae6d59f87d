"""Caption checks: which input captions the captions table accepts, and why each other one is rejected.

The readers (pcm/caption_files.py) give the captions as they stand in the file; here every caption is
checked (valid UTF-8, no control characters, not empty, not too long), exact duplicate training captions
are rejected, a seeded training subset is drawn and val/test rows are given their references. Nothing
here knows a stage config: the ingest stage passes its fields.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

from pcm.caption_files import SPLITS, Rows, valid_utf8
from storage import tables

# Every reason a row can be rejected for; each is counted as `rejected_<reason>` (0 included).
# extra_cells is given by the CSV reader (a row with more cells than the header), the others here.
REASONS = ("invalid_utf8", "control_char", "empty", "whitespace", "too_long", "duplicate", "not_in_subset",
           "extra_cells")


# C0 and C1 control characters and DEL (Unicode category Cc) but tab, line feed and carriage return,
# which are ordinary whitespace (collapsed into one space).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_NAMES = (
    "NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC "
    "FS GS RS US".split()
    + "PAD HOP BPH NBH IND NEL SSA ESA HTS HTJ VTS PLD PLU RI SS2 SS3 DCS PU1 PU2 STS CCH MW SPA EPA SOS SGC "
      "SCI CSI ST OSC PM APC".split())


def _control_message(raw: str, m: re.Match) -> str:
    c = ord(m.group())
    name = "DEL" if c == 0x7F else _CONTROL_NAMES[c if c < 0x20 else c - 0x80 + 0x20]
    what = ", a terminal escape sequence" if c in (0x1B, 0x9B) else ""
    count = len(_CONTROL.findall(raw))
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"control character U+{c:04X} ({name}{what}) at character {m.start() + 1}{more}; captions must be text"


def check_text(raw: str, max_chars: int) -> tuple[str, str, str | None, str | None]:
    """(text, raw_text, reason, error) for one caption; reason None when it is accepted."""
    if not valid_utf8(raw):
        try:  # bytes that were not UTF-8 (surrogateescape'd) are shown as \x escapes
            shown = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud83d"
            shown = raw.encode("utf-8", "backslashreplace").decode("utf-8")
        return "", shown, "invalid_utf8", "invalid UTF-8 (undecodable bytes shown as \\x escapes)"
    if not raw:
        return "", raw, "empty", "empty caption"
    if m := _CONTROL.search(raw):
        return "", raw, "control_char", _control_message(raw, m)
    text = " ".join(raw.split())
    if not text:
        return "", raw, "whitespace", "whitespace-only caption"
    if len(text) > max_chars:
        return "", raw, "too_long", f"{len(text)} characters, longer than max_chars={max_chars}"
    return text, raw, None, None


def subset_rank(seed: int, caption_id: str) -> bytes:
    """A per-caption random key: the subset of size k is the k smallest keys, so subsets of one seed
    are nested (a 10% run contains the 1% run) and do not depend on the file's row order."""
    return hashlib.blake2b(f"{seed}:{caption_id}".encode(), digest_size=8).digest()


def check_captions(rows: Rows, source: str, *, max_chars: int, dedup: bool, subset: int | None,
                   fraction: float | None, seed: int) -> tuple[dict[str, list], dict[str, int]]:
    """The CAPTIONS columns of `rows` and the counts: every caption checked (`check_text`, `max_chars`), exact
    duplicate training captions rejected (`dedup`), a seeded training subset of `subset` captions or `fraction` of
    them kept (`seed`), and each val/test row given its image's references; `source` labels every row."""
    n = len(rows.raw)
    text, raw_text = [""] * n, [""] * n
    status, error = [tables.STATUS_OK] * n, [None] * n
    reasons: Counter[str] = Counter()

    def reject(i: int, reason: str, message: str) -> None:
        text[i], status[i], error[i] = "", tables.STATUS_REJECTED, message
        reasons[reason] += 1

    for i, raw in enumerate(rows.raw):
        text[i], raw_text[i], reason, message = check_text(raw, max_chars)
        if i in rows.rejected:  # a row its reader rejected already (raw_text still shown as check_text made it)
            reason, message = rows.rejected[i]
        if reason:
            reject(i, reason, message)

    train = [i for i in range(n) if rows.split[i] == "train" and status[i] == tables.STATUS_OK]
    if dedup:
        first: dict[str, str] = {}
        unique = []
        for i in train:
            kept = first.setdefault(text[i], rows.caption_id[i])
            if kept == rows.caption_id[i]:
                unique.append(i)
            else:
                reject(i, "duplicate", f"duplicate of {kept}")
        train = unique

    counts: dict[str, int] = {}
    if subset is not None or fraction is not None:
        pool = len(train)
        k = subset if subset is not None else max(1, round(fraction * pool))
        k = min(k, pool)
        ranked = sorted(train, key=lambda i: subset_rank(seed, rows.caption_id[i]))
        for i in ranked[k:]:
            reject(i, "not_in_subset", f"not in the seeded train subset (seed {seed}, {k} of {pool} kept)")
        counts |= {"subset_pool": pool, "subset_kept": k}

    # Every row of a val/test image carries all its accepted captions as references.
    refs: dict[tuple[str, str], list[str]] = {}
    captions: Counter[str] = Counter()
    images: dict[str, set[str]] = {s: set() for s in SPLITS}
    for i in range(n):
        if status[i] == tables.STATUS_OK:
            s, image = rows.split[i], rows.image_id[i]
            captions[s] += 1
            images[s].add(image)
            if s != "train":
                refs.setdefault((s, image), []).append(text[i])
    none: list[str] = []  # one shared empty list: 600k fresh ones would wake the garbage collector
    references = [refs.get((s, image), none) for s, image in zip(rows.split, rows.image_id, strict=True)]

    ok = sum(captions.values())
    # A caption left out of a seeded subset is fine, only not chosen: counted apart from the rejected ones
    # (its row keeps status "rejected" with reason not_in_subset, so that only chosen rows are "ok").
    not_selected = reasons["not_in_subset"]
    counts |= {"rows": n, "ok": ok, "rejected": n - ok - not_selected, "not_selected": not_selected,
               "skipped_splits": rows.skipped}
    counts |= {f"rejected_{r}": reasons[r] for r in REASONS}
    for s in SPLITS:
        counts[f"{s}_captions"], counts[f"{s}_images"] = captions[s], len(images[s])
    columns = {"caption_id": rows.caption_id, "image_id": rows.image_id, "split": rows.split, "text": text,
               "raw_text": raw_text, "source": [source] * n,
               "image_path": rows.image_path, "references": references, "status": status, "error": error}
    return columns, counts
