"""Type stub of memplan's compiled core (``memplan._memplan``)."""

import os
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

__version__: str

_Path = Union[str, "os.PathLike[str]"]
#: A plan: a dict in the plan-file schema, or the path of a plan JSON.
PlanLike = Union[Mapping[str, Any], _Path]

class Estimate:
    """The estimate of one plan; ``to_dict()`` is ``memplan estimate --format json``."""

    @property
    def peak_allocated(self) -> int: ...
    @property
    def peak_reserved(self) -> int: ...
    @property
    def device_total(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def headroom(self) -> int: ...
    @property
    def breakdown(self) -> Dict[str, int]: ...
    @property
    def fits(self) -> bool: ...
    @property
    def fits_gpu(self) -> bool: ...
    @property
    def fits_host(self) -> bool: ...
    @property
    def peak_phase(self) -> str: ...
    @property
    def host_per_node(self) -> int: ...
    @property
    def host_capacity(self) -> int: ...
    @property
    def param_count(self) -> int: ...
    @property
    def warnings(self) -> List[str]: ...
    @property
    def summary(self) -> str: ...
    @property
    def verdict(self) -> str: ...
    @property
    def plan(self) -> Dict[str, Any]: ...
    def to_dict(self) -> Dict[str, Any]: ...
    def render(self, format: Literal["table", "json", "markdown"] = "table") -> str: ...
    def _repr_markdown_(self) -> str: ...

def estimate(
    plan: Optional[PlanLike] = None,
    *,
    example: Optional[str] = None,
    torchtitan: Optional[_Path] = None,
    model: Union[str, "os.PathLike[str]", Mapping[str, Any], None] = None,
    gpu: Optional[_Path] = None,
    num_gpus: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    host_ram: Union[str, int, None] = None,
    dp_shard: Optional[int] = None,
    dp_replicate: Optional[int] = None,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    cp: Optional[int] = None,
    sp: Optional[bool] = None,
    ep: Optional[int] = None,
    etp: Optional[int] = None,
    pp_schedule: Optional[str] = None,
    pp_virtual_stages: Optional[int] = None,
    ignore_max_position: Optional[bool] = None,
    float8: Optional[bool] = None,
    compile: Optional[bool] = None,
    micro_batch_size: Optional[int] = None,
    batch: Optional[int] = None,
    seq_len: Optional[int] = None,
    grad_accum_steps: Optional[int] = None,
    param_dtype: Optional[str] = None,
    reduce_dtype: Optional[str] = None,
    master_dtype: Optional[str] = None,
    optimizer: Optional[str] = None,
    ac: Optional[str] = None,
    offload: Optional[str] = None,
    no_reshard_after_forward: Optional[bool] = None,
    attention: Optional[str] = None,
    rmsnorm: Optional[str] = None,
    gqa: Optional[str] = None,
    logits: Optional[str] = None,
    optimizer_impl: Optional[str] = None,
    rotary: Optional[str] = None,
    fsdp_units: Optional[str] = None,
    loss_chunks: Optional[int] = None,
    qkv: Optional[str] = None,
    zero_grad: Optional[str] = None,
    fsdp_one_gpu: Optional[bool] = None,
    preset: Optional[str] = None,
) -> Estimate:
    """Estimate one plan.

    >>> memplan.estimate(example="seed-8b-2x48g").fits
    False
    """

def _search(
    plan: Optional[PlanLike],
    max_micro_batch: int,
    headroom: float,
    rank_by: str,
    top: int,
    fields: Optional[Mapping[str, Any]],
) -> Tuple[str, List[str]]: ...
def _max_batch(
    plan: Optional[PlanLike],
    max_micro_batch: int,
    headroom: float,
    fields: Optional[Mapping[str, Any]],
) -> Tuple[str, Optional[Estimate]]: ...
def _profiles() -> str: ...
def _examples() -> List[str]: ...
def _fields() -> List[str]: ...
def main(argv: Sequence[str]) -> int: ...
