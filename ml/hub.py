"""Whether the Hugging Face hub answers, asked once per process before the first hub read.

huggingface_hub retries a download whose hub does not answer five times with backoff (1 + 2 + 4
+ 8 + 8 s) before it looks in the local cache, and `datasets` does so for each file it asks
about: an offline machine waited ~25 s for an error it could have given at once. One request
with huggingface_hub's own metadata timeout ($HF_HUB_ETAG_TIMEOUT, 10 s) says whether the hub is
there; when it is not, this process (and the processes it starts) goes offline, so every later
read answers from the local cache at once, with the error messages it gives offline.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import httpx
from huggingface_hub import constants

log = logging.getLogger(__name__)
_unanswered: list[str] = []  # why the hub was given up in this process, for the error messages


@functools.cache  # one question per process: the answer holds for the rest of a step
def use_hub() -> bool:
    """True when the hub answers (any HTTP status counts: it is there); else offline from now on."""
    if constants.HF_HUB_OFFLINE:  # offline by choice ($HF_HUB_OFFLINE): nothing to ask
        return False
    try:
        # trust_env: the proxy settings huggingface_hub's own requests use
        httpx.head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT, follow_redirects=False)
        return True
    except httpx.HTTPError as exc:
        _unanswered.append(f"the hub at {constants.ENDPOINT} does not answer ({str(exc) or type(exc).__name__})")
        log.warning("%s: reading its files from the local cache only", _unanswered[-1])
    go_offline()
    return False


def go_offline() -> None:
    """Offline mode for the libraries that read the flag when they ask (huggingface_hub, transformers),
    for `datasets`, which read it at import, and for child processes (the trainer, the gate's worker)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # imported later, it reads the environment set above
        import datasets

        datasets.config.HF_HUB_OFFLINE = True


def offline_note() -> str:
    """Why a hub file could only be looked for in the local cache ('' while the hub is used), for an error
    message that would otherwise blame the file."""
    if use_hub():
        return ""
    why = _unanswered[0] if _unanswered else "offline ($HF_HUB_OFFLINE is set)"
    return f"; {why}, and the local cache ($HF_HOME) has no copy"
