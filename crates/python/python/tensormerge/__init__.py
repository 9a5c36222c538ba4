"""tensormerge: merge fine-tuned checkpoints by tensor arithmetic.

The Rust engine of the ``tensormerge`` command line, from Python::

    import numpy as np
    import tensormerge as tm

    mapper = tm.ModelTensorMapper.open("path/to/base")
    base = mapper.load("path/to/base")
    legal = mapper.load("path/to/legal")
    recipe = mapper.load("path/to/recipe")
    merged = base + 0.5 * ((legal - base) + (recipe - base))
    mapper.save(merged, "merged")

    np.asarray(merged)            # read-only float32 view, no copy
    merged["model.layers.0.w"]    # one tensor, in its shape, no copy

    tm.merge("config.yml", "merged-ties")   # the streaming engine
    tm.run_method("ties", base, [legal, recipe], {"density": 0.2})

Vectors are immutable: numpy views of them are read-only (copy with
``np.array(v)``, edit, and wrap again with ``ParamVector.from_numpy``).
"""

import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Union

from . import errors
from ._tensormerge import (
    MergeSummary,
    ModelTensorMapper,
    ParamVector,
    __version__,
    _eval,
    _merge,
    methods,
    run_method,
)
from .errors import (
    InvalidInputError,
    TensormergeError,
    TensormergeOSError,
    UnknownTensorError,
)

__all__ = [
    "ModelTensorMapper",
    "ParamVector",
    "MergeSummary",
    "merge",
    "eval",
    "methods",
    "run_method",
    "errors",
    "TensormergeError",
    "InvalidInputError",
    "UnknownTensorError",
    "TensormergeOSError",
    "__version__",
]

ProgressCallback = Callable[[str, str, int, int], Any]


class _TqdmProgress:
    """Draws one tqdm bar per engine phase (on stderr, as the CLI does)."""

    def __init__(self, tqdm: Any) -> None:
        self._tqdm = tqdm
        self._bar: Any = None

    def __call__(self, event: str, phase: str, amount: int, total: int) -> None:
        if event == "start":
            self._close()
            self._bar = self._tqdm(
                total=total, desc=phase, unit="B", unit_scale=True, leave=False
            )
        elif event == "advance" and self._bar is not None:
            self._bar.update(amount)
        elif event == "finish":
            self._close()
        elif event == "warning":
            warnings.warn(phase, stacklevel=3)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _warnings_only(event: str, phase: str, amount: int, total: int) -> None:
    if event == "warning":
        warnings.warn(phase, stacklevel=3)


def _progress(progress: Union[bool, ProgressCallback]) -> Optional[ProgressCallback]:
    if callable(progress):
        return progress
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _warnings_only
        return _TqdmProgress(tqdm)
    return _warnings_only


def _looks_like_yaml(text: str) -> bool:
    return "\n" in text or ": " in text or text.lstrip().startswith("{")


def merge(
    config: Union[str, "os.PathLike[str]", Dict[str, Any]],
    out: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    dry_run: bool = False,
    seed: Optional[int] = None,
    threads: Optional[int] = None,
    progress: Union[bool, ProgressCallback] = True,
    overwrite: bool = False,
    allow_non_finite: bool = False,
    max_memory: Optional[int] = None,
) -> MergeSummary:
    """Runs a mergekit-style merge with the streaming engine, exactly as
    ``tensormerge merge CONFIG -o OUT`` does (same output bytes).

    Args:
        config: a path (``os.PathLike``, or a ``str`` without a newline or
            ``": "``) to a YAML config, YAML text, or a dict (the parsed
            config).
        out: the output directory (written into a temporary sibling and
            renamed into place when complete). Not needed with ``dry_run``.
        dry_run: plan only (headers are read, no weight): the summary's
            ``plan`` is what ``--dry-run`` prints.
        seed: overrides the config's ``seed`` (``--seed``).
        threads: worker threads (``-j``); default one per core.
        progress: ``True`` draws a tqdm bar when tqdm is installed (silent
            otherwise), ``False`` is silent, a callable receives
            ``(event, phase, amount, total)`` with event ``"start"``,
            ``"advance"`` (amount: bytes since the last call), ``"finish"``
            or ``"warning"`` (phase: the text). Warnings become
            ``warnings.warn`` unless a callable is given.
        overwrite: replace an existing ``out`` (``--overwrite``).
        allow_non_finite: merge NaN/infinite weights instead of refusing
            them (``--allow-non-finite``).
        max_memory: memory budget in bytes for tensors in flight
            (``--max-memory``).

    Returns:
        A :class:`MergeSummary` (tensors, bytes, seconds, seed, warnings).

    Raises:
        InvalidInputError: bad config or models (CLI exit code 1).
        TensormergeOSError: output exists, unreadable files (exit code 2).
        KeyboardInterrupt: Ctrl-C (or an exception from the progress
            callback) stopped the merge; the temporary output was removed.

    The GIL is released while the engine runs.
    """
    text: Optional[str] = None
    path: Optional[str] = None
    if isinstance(config, dict):
        import json

        text = json.dumps(config)
        label = "<dict>"
    elif isinstance(config, os.PathLike):
        path = os.fspath(config)
        label = path
    elif isinstance(config, str):
        if _looks_like_yaml(config):
            text = config
            label = "<string>"
        else:
            path = config
            label = config
    else:
        raise TypeError(
            f"merge: config must be a path, YAML text or a dict, got {type(config).__name__}"
        )
    out_path = None if out is None else os.fspath(out)
    return _merge(
        label,
        text,
        path,
        out_path,
        dry_run,
        seed,
        threads,
        overwrite,
        allow_non_finite,
        max_memory,
        _progress(progress),
    )


def eval(  # noqa: A001 - the CLI's name for it
    expr: str,
    models: Mapping[str, Union[str, "os.PathLike[str]"]],
    out: Union[str, "os.PathLike[str]"],
    *,
    dtype: Optional[str] = None,
    template: Optional[str] = None,
    threads: Optional[int] = None,
    progress: Union[bool, ProgressCallback] = True,
    overwrite: bool = False,
    allow_non_finite: bool = False,
    max_memory: Optional[int] = None,
) -> MergeSummary:
    """Evaluates a vector expression over models tensor by tensor, streaming,
    exactly as ``tensormerge eval EXPR --model NAME=REF ... -o OUT`` does
    (same output bytes; memory bounded by the chunk size, not the model).

    The streaming counterpart of ParamVector arithmetic, for models that do
    not fit in memory::

        tm.eval("base + 0.5 * ((legal - base) + (recipe - base))",
                {"base": "b", "legal": "l", "recipe": "r"}, "merged")

    Args:
        expr: the expression (``+ - * /``, numbers, model names, parentheses).
        models: expression name -> model reference (path or hub id).
        out: the output directory (temporary sibling, renamed when complete).
        dtype: output dtype of float tensors (``--dtype``); default: each
            tensor's dtype in the template.
        template: the model name whose non-float tensors and config files the
            output takes (``--template``); default: the first one used.
        threads, progress, overwrite, allow_non_finite, max_memory: as for
            :func:`merge`.

    Returns:
        A :class:`MergeSummary` (``tensors_merged`` counts evaluated tensors).
    """
    pairs = [(str(k), os.fspath(v)) for k, v in models.items()]
    return _eval(
        expr,
        pairs,
        os.fspath(out),
        dtype,
        template,
        threads,
        overwrite,
        allow_non_finite,
        max_memory,
        _progress(progress),
    )
