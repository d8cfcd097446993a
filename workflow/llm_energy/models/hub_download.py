"""Hub models: fetch a repository pinned to a revision, or take it from a populated HF cache offline."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

from llm_energy import hub
from llm_energy.errors import ArtifactError, SourceUnavailableError
from llm_energy.models.specs import HubSpec

log = logging.getLogger(__name__)


HUB_PROBE_TIMEOUT_S = 5.0
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _hub_unreachable_reason(endpoint: str) -> str | None:
    """Why the hub cannot be reached, or None if a TCP connection opens.

    huggingface_hub retries a dead network for about 23 s; one short connect fails fast instead.
    Behind a proxy a direct connection says nothing, so the check is skipped there.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc})"


def _unavailable(name: str, spec: HubSpec, reason: str) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"models.{name}: hub model '{spec.id}' at revision '{spec.revision}' is not available: {reason}. "
        f"Download it on a machine with network (e.g. `hf download {spec.id} --revision {spec.revision} "
        f"--local-dir DIR`) and set models.{name}.source: local with models.{name}.path: DIR, or "
        f"populate the Hugging Face cache (HF_HOME) with it and run again."
    )


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Replicate a cache snapshot (symlinks into blobs) as plain files: hard links where possible."""
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        real = item.resolve()
        target.unlink(missing_ok=True)
        try:
            os.link(real, target)  # no second copy of multi-GB weights
        except OSError:
            shutil.copy2(real, target)


def _local_dir_commit(weights_dir: Path) -> str | None:
    """The commit huggingface_hub recorded for a local_dir download (first line of each .metadata)."""
    commits: set[str] = set()
    meta_root = weights_dir / ".cache" / "huggingface" / "download"
    for meta in meta_root.rglob("*.metadata"):
        first = meta.read_text(errors="replace").splitlines()[:1]
        if first and _COMMIT_RE.match(first[0].strip()):
            commits.add(first[0].strip())
    if len(commits) > 1:
        log.warning("%s holds files of several commits %s", weights_dir, sorted(commits))
        return None
    return commits.pop() if commits else None


def download_hub_model(name: str, spec: HubSpec, weights_dir: Path) -> str:
    """Fetch `spec` into `weights_dir`; returns the resolved commit sha.

    A populated HF cache is used first (no network needed); otherwise the files are downloaded with
    snapshot_download(local_dir=weights_dir). Offline or unreachable => SourceUnavailableError, fast.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError

    token = os.environ.get("HF_TOKEN") or False  # False: never fall back to a stored token file
    patterns = list(spec.allow_patterns)
    cache_dir = hub.cache_dir()

    cache_miss = f"the HF cache ({cache_dir}) does not hold it"
    try:
        cached = snapshot_download(
            spec.id,
            revision=spec.revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=True,
            token=token,
        )
    except IncompleteSnapshotError:
        cached, cache_miss = None, f"the HF cache ({cache_dir}) holds only part of it"
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None and Path(cached).is_dir():
        commit = Path(cached).name  # .../snapshots/<commit>
        log.info("hub model %s@%s found in the HF cache (commit %s)", spec.id, spec.revision, commit)
        if weights_dir.exists():
            shutil.rmtree(weights_dir)  # files of another revision would pollute the hashes
        _link_or_copy_tree(Path(cached), weights_dir)
        return commit

    if hub.offline("TRANSFORMERS_OFFLINE"):
        raise _unavailable(name, spec, f"offline mode (HF_HUB_OFFLINE) is on and {cache_miss}")
    endpoint = hub.endpoint()
    reason = _hub_unreachable_reason(endpoint)
    if reason:
        raise _unavailable(name, spec, reason)

    previous = _local_dir_commit(weights_dir) if weights_dir.exists() else None
    if previous and _COMMIT_RE.match(spec.revision) and previous != spec.revision:
        shutil.rmtree(weights_dir)  # an interrupted download of the same commit resumes; another is wiped
    log.info("downloading %s@%s (%s) into %s", spec.id, spec.revision, patterns, weights_dir)
    try:
        snapshot_download(
            spec.id,
            revision=spec.revision,
            local_dir=weights_dir,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            token=token,
            endpoint=endpoint,
        )
    except LocalEntryNotFoundError as exc:
        raise _unavailable(name, spec, f"download failed ({type(exc).__name__})") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = " (gated or private: set env HF_TOKEN to a token with access)" if status in (401, 403) else ""
        # str(exc) carries the URL and server message, never the token.
        raise _unavailable(name, spec, f"the hub answered {status}{hint}: {exc}") from None

    if _COMMIT_RE.match(spec.revision):
        return spec.revision
    commit = _local_dir_commit(weights_dir)
    if commit is None:
        ref = cache_dir / f"models--{spec.id.replace('/', '--')}" / "refs" / spec.revision
        commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None:
        raise ArtifactError(
            f"{weights_dir}: downloaded {spec.id}@{spec.revision} but could not tell "
            f"which commit it resolved to; pin models.{name}.revision to a commit sha"
        )
    return commit
