"""``headstart serve RUN``: check the options, bind the port, load the run, serve until Ctrl-C.

The port is bound before the run is loaded, so a busy port fails at once; connections are accepted
once the model has scored a warm-up image. Ctrl-C (SIGINT) and SIGTERM stop the server gracefully
(requests under way are answered) and the command exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from pathlib import Path
from typing import Any

from .commands import EXIT_OK


class _Stopped(Exception):
    """SIGTERM arrived (during loading, or re-raised by uvicorn after its graceful shutdown)."""


def run_serve(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..serve import ServeSettings, bind, idle_exit_from_env

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"'headstart serve' needs {', '.join(missing)}: pip install 'headstart[serve]'")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_bytes=args.max_bytes,
                             quiet=args.quiet, idle_exit_s=idle_exit_from_env())
    settings.check()
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        sock = bind(args.host, args.port)
        return _serve(args, settings, sock)
    except (KeyboardInterrupt, _Stopped):
        _say("stopped")
        return EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped


def _serve(args: argparse.Namespace, settings: Any, sock: Any) -> int:
    from ..predictor import Predictor
    from ..serve import address_of, is_loopback, serve

    predictor = Predictor.load(args.run, engine=args.engine, onnx_path=_onnx_path(args))
    predictor.warm_up(settings.max_batch)
    card = _card(predictor)
    url = address_of(sock)
    if not is_loopback(args.host):
        _say(f"warning: listening on {args.host}, reachable from other machines, with no authentication; "
             "put it behind a proxy that checks who calls, or use --host 127.0.0.1")
    names = predictor.class_names
    batching = "no batching" if settings.max_batch == 1 else \
        f"batches of up to {settings.max_batch}, {settings.max_wait_ms:g} ms wait"

    def ready() -> None:
        _say(f"serving '{Path(args.run).name}' ({len(names)} classes; {predictor.forward}; {batching}) on "
             f"{url}: POST /predict, GET /health, GET /metadata, docs at {url}/docs; Ctrl-C to stop")

    serve(predictor, settings, sock, card=card, on_ready=ready)
    _say("stopped")
    return EXIT_OK


def _onnx_path(args: argparse.Namespace) -> Path | None:
    """RUN/model.onnx for ``--engine onnx``, exported first when it is missing."""
    if args.engine != "onnx":
        return None
    path = Path(args.run) / "model.onnx"
    if not path.is_file():
        _export(Path(args.run), path)
    return path


def _export(run: Path, path: Path) -> None:
    """Export ``run`` to ``path`` as ``headstart export RUN --format onnx`` does (verified before it is kept)."""
    from ..export import export

    _say(f"{path} is missing; exporting the run first (headstart export {run} --format onnx)")
    result = export(run, path, format="onnx")
    _say(f"exported {path} ({result['bytes'] / 2**20:.1f} MiB), checked against headstart on "
         f"{result['verification'].get('n_images', 'the')} images")


def _card(predictor: Any) -> dict[str, Any]:
    """The model card: the one written beside the exported graph (engine onnx), else built from the run."""
    import json

    from ..model_card import CARD_JSON, model_card

    written = predictor.run.path / CARD_JSON
    if predictor.engine == "onnx" and written.is_file():
        try:
            return json.loads(written.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a damaged card: built again below
    return model_card(predictor.run)


def _say(text: str) -> None:
    print(f"headstart serve: {text}", file=sys.stderr, flush=True)
