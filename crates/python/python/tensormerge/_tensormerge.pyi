"""Type stubs of the compiled module ``tensormerge._tensormerge``."""

import os

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

_Number = Union[int, float, np.floating[Any], np.integer[Any]]

class ParamVector:
    """A model's floating-point parameters as one flat float32 vector.

    Immutable: arithmetic makes new vectors; numpy views are read-only and
    share the Rust-owned buffer (no copy). Combining vectors of different
    layouts raises InvalidInputError (a ValueError) naming the first tensor
    that differs.
    """

    @staticmethod
    def from_numpy(array: npt.ArrayLike, mapper: ModelTensorMapper) -> ParamVector:
        """Copies a 1-D array (converted to float32) into a vector of
        ``mapper``'s layout; ValueError when its length is not ``len(mapper)``."""
    @property
    def names(self) -> List[str]:
        """Names of the floating-point tensors, in layout order."""
    def __len__(self) -> int:
        """Number of elements (float parameters)."""
    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a floating-point tensor of the layout."""
    def __getitem__(self, name: str) -> npt.NDArray[np.float32]:
        """Read-only view (no copy) of one tensor, in its shape.
        UnknownTensorError (a KeyError) for an unknown name."""
    def __array__(
        self, dtype: Optional[npt.DTypeLike] = None, copy: Optional[bool] = None
    ) -> npt.NDArray[np.float32]:
        """``np.asarray(v)``: a read-only float32 view of the whole vector."""
    def dot(self, other: ParamVector) -> float:
        """Dot product (accumulated in float64)."""
    def norm(self, ord: int = 2) -> float:
        """L2 (``ord=2``) or L1 (``ord=1``) norm, accumulated in float64."""
    def cosine(self, other: ParamVector) -> float:
        """Cosine similarity (0.0 when either vector is zero)."""
    def __add__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __radd__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __sub__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __rsub__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __mul__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __rmul__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __truediv__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __rtruediv__(self, other: Union[ParamVector, _Number]) -> ParamVector: ...
    def __neg__(self) -> ParamVector: ...

class ModelTensorMapper:
    """Maps models of one layout to flat float32 ParamVectors and back."""

    def __init__(self, tensors: Sequence[Tuple[str, Sequence[int], str]]) -> None:
        """A mapper for an explicit layout of ``(name, shape, dtype)``
        (dtype as in safetensors, ``"F32"``, or PyTorch, ``"bfloat16"``)."""
    @staticmethod
    def open(reference: str) -> ModelTensorMapper:
        """Opens a model (directory, .safetensors file or cached hub id;
        headers only); it becomes the default template of ``save``."""
    def load(self, reference: str) -> ParamVector:
        """Reads a model into a new vector; InvalidInputError naming the
        first differing tensor when its layout differs."""
    def save(
        self,
        vector: ParamVector,
        out: Union[str, "os.PathLike[str]"],
        template: Optional[str] = None,
        *,
        overwrite: bool = False,
        max_shard_bytes: Optional[int] = None,
    ) -> str:
        """Writes ``vector`` as a model directory in this mapper's dtypes,
        non-float tensors and config files from ``template`` (default: the
        opened model). Returns the output directory."""
    @property
    def tensors(self) -> List[Tuple[str, List[int], str]]:
        """Every tensor of the layout as ``(name, shape, dtype)``."""
    def __len__(self) -> int:
        """Number of float parameters."""
    def zeros(self) -> ParamVector:
        """A vector of zeros of this layout."""

class MergeSummary:
    """What ``merge`` did."""

    out: Optional[str]
    dry_run: bool
    tensors: int
    tensors_merged: int
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    shards: int
    seconds: float
    seed: int
    threads: int
    warnings: List[str]
    plan: Optional[str]

def _merge(
    label: str,
    config_text: Optional[str],
    config_path: Optional[str],
    out: Optional[str],
    dry_run: bool,
    seed: Optional[int],
    threads: Optional[int],
    overwrite: bool,
    allow_non_finite: bool,
    max_memory: Optional[int],
    progress: Optional[Callable[[str, str, int, int], Any]],
) -> MergeSummary: ...
def _eval(
    expr: str,
    models: List[Tuple[str, str]],
    out: str,
    dtype: Optional[str],
    template: Optional[str],
    threads: Optional[int],
    overwrite: bool,
    allow_non_finite: bool,
    max_memory: Optional[int],
    progress: Optional[Callable[[str, str, int, int], Any]],
) -> MergeSummary: ...
def methods() -> List[Dict[str, Any]]:
    """Every registered merge method with its parameters."""
@overload
def run_method(
    name: str,
    base: Optional[ParamVector],
    models: Sequence[ParamVector],
    params: Optional[Dict[str, Any]] = None,
    *,
    seed: int = 0,
    tensor: str = "tensor",
) -> ParamVector: ...
@overload
def run_method(
    name: str,
    base: Optional[npt.ArrayLike],
    models: Sequence[npt.ArrayLike],
    params: Optional[Dict[str, Any]] = None,
    *,
    seed: int = 0,
    tensor: str = "tensor",
) -> npt.NDArray[np.float32]:
    """Runs a merge method in memory, bit-identical to ``tensormerge merge``."""
