"""How transformers' `generate` decides to stop after each decoding step: `per_step` or `deferred`.

After every decoding step `generate` asks a stop check whether all rows are finished, and the check
hands that step's tokens to the streamer (the harness's per-step clock). transformers' default,
`StopCheck`, reads `bool(unfinished_sequences.max() == 0)` and, with a streamer, `tokens.cpu()`: the
host waits for the device twice per step and cannot queue the next step while the device runs this
one. On the fast path at batch 1, where a decoding step is a few milliseconds of host work around one
CUDA-graph replay, those waits are what the step costs beyond the host's own work.

transformers' `DeferredStopCheck` copies the flag and the tokens asynchronously into pinned memory and
reads them one step later, after a CUDA event: the host stays one step ahead and never waits for the
step it just queued. Upstream enables it only on mps. `deferred` enables it on CUDA for the duration
of our `generate` calls (and of the bare reference that harness_overhead.py compares against, so both
run the same engine). Two consequences, both recorded by the engine path's `stop_check`:
- a token reaches the streamer, hence the harness's clock, one step after it was computed: when it is
  on the host, which is the time the latency definitions ask for (DESIGN: when the token reaches the
  caller);
- when every row stops at EOS, `generate` has already queued one more step, which it undoes in the
  returned tokens; its KV entries stay in the static cache, which the backend resets before every
  batch (and `generate` resets its own), so no rollback is needed: the cache is never cropped.
Only with a static cache: a dynamic cache is read after generate (its KV bytes) and would hold the
extra step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

STOP_CHECKS = ("per_step", "deferred")
# CUDA only: DeferredStopCheck records torch.Event, which the CPU backend does not support. Tests of
# our logic on CPU widen this and stand in a no-op event (CPU copies are synchronous anyway).
DEFERRED_DEVICES = ("cuda",)


def resolve(setting: str, device: str, cache_implementation: str) -> str:
    """`auto`: deferred on CUDA over a static cache, transformers' per-step check otherwise."""
    if setting == "auto":
        return "deferred" if device == "cuda" and cache_implementation == "static" else "per_step"
    return setting


def unavailable_reason(device: str, cache_implementation: str) -> str | None:
    """Why `deferred` cannot run here, or None."""
    if device not in DEFERRED_DEVICES:
        return f"the deferred stop check needs CUDA events, and the device is '{device}'"
    if cache_implementation != "static":
        return "the deferred stop check needs a static cache (a dynamic cache would keep the extra step)"
    try:
        from transformers.generation import utils
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        return f"transformers does not import: {exc}"
    if not hasattr(utils, "DeferredStopCheck"):
        import transformers

        return f"transformers {transformers.__version__} has no DeferredStopCheck (it came with transformers 5.17)"
    return None


class Scope:
    """Counts the generate calls that used the deferred check while the scope was open."""

    def __init__(self) -> None:
        self.deferred_calls = 0


def _deferred_class(upstream: type, scope: Scope) -> type:
    init_signature = inspect.signature(upstream.__init__)

    class DeferredOnDevice(upstream):  # type: ignore[misc, valid-type]
        @staticmethod
        def is_supported(device, *args, **kwargs) -> bool:
            is_assistant = kwargs.get("is_assistant", args[-1] if len(args) >= 3 else False)
            return device.type in DEFERRED_DEVICES and not is_assistant

        def __init__(self, *args, **kwargs) -> None:
            bound = init_signature.bind(self, *args, **kwargs)
            # No rollback: the static caches are reset before their next use (module docstring).
            for name, value in (("cache", None), ("cache_is_returned", False)):
                if name in init_signature.parameters:
                    bound.arguments[name] = value
            super().__init__(*bound.args[1:], **bound.kwargs)
            scope.deferred_calls += 1

    return DeferredOnDevice


@contextlib.contextmanager
def stop_check(mode: str) -> Iterator[Scope]:
    """While open, transformers' generate uses the stop check `mode` (STOP_CHECKS). `generate` looks
    DeferredStopCheck up in its module when it runs, so the swap covers exactly these calls; the
    measured process runs generate from one thread."""
    scope = Scope()
    if mode != "deferred":
        yield scope
        return
    from transformers.generation import utils

    upstream = utils.DeferredStopCheck
    utils.DeferredStopCheck = _deferred_class(upstream, scope)
    try:
        yield scope
    finally:
        utils.DeferredStopCheck = upstream
