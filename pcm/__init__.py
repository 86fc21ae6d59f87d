"""PCM-Net: zero-shot image captioning trained on synthetic images (the work of each stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Captioner"]

if TYPE_CHECKING:
    from pcm.caption import Captioner


def __getattr__(name: str) -> Any:
    # `from pcm import Captioner` imports pcm.caption only then: `import pcm` stays cheap (no torch).
    if name == "Captioner":
        from pcm.caption import Captioner

        return Captioner
    raise AttributeError(f"module 'pcm' has no attribute {name!r}")
