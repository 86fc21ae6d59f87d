"""Where Prefect keeps the stage tasks' cache records: on this host, never in the shared run root.

A Prefect result record names its own serializer (`metadata.serializer`): a record rewritten to
`"pickle"` is unpickled when read, a JSON one may name an `object_decoder` to import, and
Prefect's JSON decoder imports any `{"__class__": "module.Thing"}` it meets. The run root is meant
to be shared (NFS, many hosts), so records kept there would let whoever can write the root run
code on every worker. (A result storage that validates what it reads would have to be a block
saved on the Prefect server; keeping the records private needs nothing.)

So the records live under this user's Prefect home (`PREFECT_HOME`, default ~/.prefect), one
directory per run root: `<PREFECT_HOME>/pcm-results/<sha256 of the root's path>[:16]`. The truth
stays in the root: before trusting a cache hit, `flows.caching.run_stage` checks the stage's own
done marker and outputs, so another host (which has no record yet) simply runs the stage task,
which finds the finished stage on disk and returns it without redoing the work.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from storage import remote

log = logging.getLogger(__name__)


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser().resolve()


def results_dir(root: str | Path) -> Path:
    """This host's directory of cache records for run root `root` (outside it; an object-store URL is named as is)."""
    if remote.is_url(root):
        return prefect_home() / "pcm-results" / hashlib.sha256(str(root).rstrip("/").encode()).hexdigest()[:16]
    resolved = Path(root).expanduser().resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    path = prefect_home() / "pcm-results" / digest
    if path.is_relative_to(resolved):
        log.warning("PREFECT_HOME=%s lies inside the run root %s: whoever can write the root can plant Prefect "
                    "cache records (and the server database) there; if the root is shared, set PREFECT_HOME "
                    "elsewhere", prefect_home(), resolved)
    return path
