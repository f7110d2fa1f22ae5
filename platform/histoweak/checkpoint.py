"""A histoweak checkpoint directory: ``state.pt`` (weights) beside ``config.json`` (the run's config).

``state.pt`` holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: unpickling a file can then build tensors,
containers, numbers and strings but never call a function, and a checkpoint
from anyone is safe to open. Every reader goes through ``load_checkpoint``;
a file that needs more than that (a pickled object, an old checkpoint with
numpy scalars in it) is refused with a ``ValueError`` naming the file.

Plain PyTorch: Ray Train hands these directories around, but this module
does not know about it.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CONFIG_FILE", "FORMAT", "STATE_FILE", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
FORMAT = 2  # 1 (unmarked): pickled numpy scalars, loadable only by unpickling arbitrary objects
_STATE_KEYS = ("model", "optimizer", "epoch", "best")
# What torch's weights-only unpickler admits besides containers; checked on save, so what is saved loads.
_PLAIN = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.device)


def save_checkpoint(directory: str | Path, model_state: dict, optimizer_state: dict, epoch: int,
                    best: float | None, config: dict[str, Any]) -> Path:
    """Write ``state.pt`` and ``config.json`` into ``directory`` (created if needed).

    Parameters
    ----------
    directory : the checkpoint directory.
    model_state, optimizer_state : ``state_dict()`` of the model and of its optimizer.
    epoch : the epoch just finished (0-based).
    best : the best selection-metric value so far (numpy scalars become ``float``), or None.
    config : the run's config, JSON-serialisable (other values are written as ``str``);
        ``config.json`` holds it with ``epoch`` added.

    Returns
    -------
    Path
        ``directory``.

    Raises
    ------
    ValueError
        A state holds something other than tensors and plain values (it would not load).
    """
    d = Path(directory)
    state = {"format": FORMAT, "model": model_state, "optimizer": optimizer_state, "epoch": int(epoch),
             "best": None if best is None else float(best)}
    _check_plain(state, "state")
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / STATE_FILE)
    (d / CONFIG_FILE).write_text(json.dumps({**config, "epoch": int(epoch)}, default=str))
    return d


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint directory written by ``save_checkpoint``, executing nothing from it.

    Parameters
    ----------
    directory : the checkpoint directory.
    map_location : device for the tensors, as for ``torch.load``.

    Returns
    -------
    state : dict
        ``model`` and ``optimizer`` state dicts, ``epoch`` (int), ``best`` (float or None), ``format``.
    config : dict
        The run's config from ``config.json`` (with ``epoch``).

    Raises
    ------
    ValueError
        Naming the file: ``state.pt`` or ``config.json`` is missing; ``state.pt`` is not a PyTorch
        checkpoint, needs more than tensors and plain values (a pickled object or an old-format file:
        refused, not run), or lacks the format marker; ``config.json`` is not a JSON object.
    """
    d = Path(directory)
    state_path, config_path = d / STATE_FILE, d / CONFIG_FILE
    for path in (state_path, config_path):
        if not path.is_file():
            raise ValueError(f"{path}: not found; {d} is not a histoweak checkpoint directory")
    if not zipfile.is_zipfile(state_path):
        raise ValueError(f"{state_path}: not a PyTorch checkpoint (empty, truncated or another format)")
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{state_path}: refused: not a safe histoweak checkpoint (old format or tampered: "
                         f"{_unpickler_reason(exc)}); only tensors and plain values are loaded") from None
    except Exception as exc:  # torch reports a damaged archive as RuntimeError, KeyError, EOFError, ...
        raise ValueError(f"{state_path}: unreadable ({type(exc).__name__}: {_one_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{state_path}: refused: not a histoweak checkpoint of format {FORMAT} (format marker: "
                         f"{found!r}); retrain, or re-save it with histoweak.checkpoint.save_checkpoint")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{state_path}: missing {missing}")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path}: not valid JSON ({_one_line(exc)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: must be a JSON object, got {type(config).__name__}")
    return state, config


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoints hold str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__name__}; "
                         "checkpoints hold only tensors and plain values (convert it first)")


def _unpickler_reason(exc: Exception) -> str:
    # torch's message is a paragraph advising to turn weights-only loading off; keep only the cause.
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if m:
        return f"it would call {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
    return _one_line(m.group(1) if m else exc)


def _one_line(text: Any, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."
