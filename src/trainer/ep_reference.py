"""torchtitan 0.2.2's own MoE and expert parallelism, per rank on CPU/Gloo, for checking memplan's estimator.

The tiny Llama of reference_llama.py (eager RMSNorm, complex rotary, repeat_kv, SDPA) with its dense
feed-forward replaced by torchtitan 0.2.2's `torchtitan.models.moe.MoE` (imported, not copied):
TokenChoiceTopKRouter (softmax scores in fp32, top-k, route_norm, Mixtral-like: the arguments of
torchtitan's Qwen3 MoE flavours, score_before_experts=False, no shared expert), TokenReorderer,
GroupedExperts (`torch._grouped_mm` in bf16, torchtitan's default, or the for-loop path with
"experts": "for_loop"), the auxiliary-loss-free load balancing buffers (load_balance_coeff 1e-3) and
its optimizer pre-step hook (`build_optimizers_with_moe_load_balancing`). Parallelized with
torchtitan's own code, in parallelize_llama's order (models/llama4/infra/parallelize.py):
`apply_moe_ep_tp` (ExpertParallel on the "ep" mesh: experts Shard(0), token dispatch/combine with
all_to_all_single(_autograd)), `apply_ac` (mode none/full), `apply_fsdp` (experts on the "efsdp"
mesh, the rest on "fsdp", explicit prefetching under EP, gradient division off). Meshes come from
torchtitan's ParallelDims (world = dp_shard, ep borrows dp_shard as torchtitan does). fp32 throughout
(MixedPrecisionPolicy(fp32, fp32)); AdamW foreach through torchtitan's OptimizersContainer.

CPU patches (torchtitan assumes CUDA; none of them changes what is allocated beyond a few bytes):
 1. torch.histc has no CPU kernel for int64 ("histogram_cpu" not implemented for 'Long'); the router
    and reorderer call it on the expert indices. Integer inputs go to torch.bincount(minlength=bins),
    which gives what CUDA's histc gives for 0..E-1 indices (an int64 (E,) count).
 2. generate_permute_indices (models/moe/kernels.py) launches a triton kernel; it is called with
    use_cpu=True, torchtitan's own CPU reference fill_indices_cpu (same int32 (padded_max_len,) output).
 3. torchtitan.distributed.parallel_dims.device_type = "cpu" (its default is "cuda").
 4. Gloo has no PREMUL_SUM: set_force_sum_reduction_for_comms(True) on every FSDP module (only if
    torchtitan sets gradient_divide_factor 1.0, which FSDP turns into PREMUL_SUM; ran as SUM).
 5. AC: preserve_rng_state=False (torchtitan's default True keeps torch.get_rng_state(), a 5 KB CPU
    tensor per block, which on a GPU is host memory, not device memory).

    torchrun --nproc_per_node=2 src/trainer/ep_reference.py /tmp/shim.so \
        '{"batch":2,"seq":64,"ep":2,"ac":"none","steps":3,"data_seed":0}'

With "data": "trainer" the model's weights and token batches are the trainer's own (memplan's
src/trainer/expert_parallel.rs and mod.rs `synthetic_tokens`, with "seed", default 0): after the
model is built, torch.manual_seed(seed) and every weight drawn in `model.parameters()` order as the
trainer draws it (`torch.randn(shape) * 0.02`, the norms ones) on the uncounted channel and copied in;
rank r reads rows r*b..(r+1)*b of the trainer's `synthetic_tokens(seed, step, world*b, seq, V)`. The
routing (rows each rank's experts receive) is then the trainer's, so that a multi-process run can be
compared byte for byte (tests/data/ep2_trainer_data_torch_2.11.jsonl). Run it with OMP_NUM_THREADS=1,
as the trainer's tests run.

It needs torchtitan 0.2.2 (0.3.0 does not import on torch 2.11) and its triton import satisfied, in a
venv beside torch 2.11.0 (docs/research/frameworks-on-torch-2.11.md, section 2). The measured plans are in
tests/data/ep_torch_2.11.jsonl, checked by tests/estimator.rs.

Each rank prints `MPEP {json}`: per step the peaks of forward+loss, backward and optimizer (peak reset
at the step start and before backward and the optimizer) relative to the counter before the model was
built, the bytes held at the step start and end, "peak", and the routing seen by this rank's MoE
layers (rows received by the experts after dispatch, "recv", and after the padded permute, "padded").
"""
import ctypes, functools, json, os, sys

lib = ctypes.CDLL(sys.argv[1])
cfg = json.loads(sys.argv[2])
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from reference_llama import Attention, RMSNorm, Transformer, precompute_freqs_cis
from reference_shim import install_counter

# --- CPU patches (see the docstring) ---
_histc = torch.histc


def _histc_cpu(x, bins=100, min=0, max=0):
    if x.is_floating_point():
        return _histc(x, bins=bins, min=min, max=max)
    assert min == 0 and max == bins
    return torch.bincount(x, minlength=bins)


torch.histc = _histc_cpu
import torchtitan.models.moe.kernels as tt_kernels
import torchtitan.models.moe.utils as tt_utils

tt_utils.generate_permute_indices = functools.partial(tt_kernels.generate_permute_indices, use_cpu=True)
import torchtitan.distributed.parallel_dims as tt_pd

tt_pd.device_type = "cpu"
import torchtitan.distributed.expert_parallel as tt_ep
from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
from torchtitan.config.job_config import ActivationCheckpoint, Optimizer as OptimizerConfig
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.llama4.infra.parallelize import apply_fsdp, apply_moe_ep_tp
from torchtitan.models.moe import MoE, MoEArgs

counter = install_counter(lib)

# routing record: rows in and out of each _permute call (dispatch under EP, padding wrapper without)
ROUTE = []
_permute = tt_utils._permute


def _permute_rec(x, num_tokens_per_expert, ep_degree, num_local_experts):
    r = _permute(x, num_tokens_per_expert, ep_degree, num_local_experts)
    ROUTE.append((x.shape[0], r[1].shape[0]))
    return r


tt_utils._permute = _permute_rec
tt_ep._permute = _permute_rec

H, L, NH, NKV = cfg.get("hidden", 64), cfg.get("layers", 2), cfg.get("heads", 4), cfg.get("kv_heads", 2)
E, K, FE, V = cfg.get("experts", 4), cfg.get("top_k", 2), cfg.get("moe_inter", 128), cfg.get("vocab", 256)
B, S = cfg["batch"], cfg["seq"]
GROUPED = cfg.get("experts_impl", "grouped_mm") == "grouped_mm"


class MoEBlock(nn.Module):
    """reference_llama's TransformerBlock with torchtitan's MoE as the feed-forward (attribute names
    as torchtitan's MoE blocks: `moe`, `moe_enabled`, which apply_moe_ep_tp/apply_fsdp look for)."""

    def __init__(self):
        super().__init__()
        self.attention = Attention(H, NH, NKV)
        self.attention_norm = RMSNorm(H)
        self.ffn_norm = RMSNorm(H)
        self.moe_enabled = True
        self.moe = MoE(MoEArgs(num_experts=E, num_shared_experts=0, top_k=K, score_func="softmax",
                               route_norm=True, route_scale=1.0, score_before_experts=False,
                               use_grouped_mm=GROUPED, load_balance_coeff=cfg.get("load_balance_coeff", 1e-3),
                               _debug_force_load_balance=bool(cfg.get("force_balance", False))),
                       dim=H, hidden_dim=FE)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.moe(self.ffn_norm(h))


class MoETransformer(Transformer):
    def __init__(self):
        nn.Module.__init__(self)
        self.float_logits = True
        self.tok_embeddings = nn.Embedding(V, H)
        self.register_buffer("freqs_cis", precompute_freqs_cis(H // NH, S * 2), persistent=True)
        self.layers = nn.ModuleDict({str(i): MoEBlock() for i in range(L)})
        self.norm = RMSNorm(H)
        self.output = nn.Linear(H, V, bias=False)


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
EP = cfg.get("ep", world)
pd = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=EP, etp=1, world_size=world)
pd.build_mesh()
torch.manual_seed(0)
lib.mp_set_channel(0)
lib.mp_reset_peak(0)
base = counter()[0]
model = MoETransformer()
with torch.no_grad():
    for blk in model.layers.values():
        blk.moe.init_weights(0.02, torch.device("cpu"))
TRAINER_DATA = cfg.get("data", "reference") == "trainer"
SEED = cfg.get("seed", 0)
M64 = (1 << 64) - 1


def synthetic_tokens(seed, index, batch, seq, vocab):
    """memplan's trainer `synthetic_tokens` (src/trainer/mod.rs): splitmix64 row starts, then
    next = (5 x + 3) mod P over the first P = 2^floor(log2(min(vocab, 128))) tokens."""
    cycle = 1 << (max(1, min(vocab, 128)).bit_length() - 1)
    state = (seed ^ (index * 0xD6E8FEB86659FD93)) & M64
    out = []
    for _ in range(batch):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        x = (z ^ (z >> 31)) % cycle
        for _ in range(seq + 1):
            out.append(x)
            x = (5 * x + 3) % cycle
    return torch.tensor(out, dtype=torch.int64).view(batch, seq + 1)


if TRAINER_DATA:
    # the trainer's draws (expert_parallel.rs train_moe): 2-D and 3-D weights randn * 0.02,
    # the norms ones, in model.parameters() order; uncounted, as the trainer's
    lib.mp_set_channel(2)
    torch.manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape) * 0.02)
    del p  # the loop variable would keep the last parameter (output, V x h) past its sharding
    lib.mp_set_channel(0)

# torchtitan parallelize_llama order (models/llama4/infra/parallelize.py): EP/TP, AC, FSDP
if pd.tp_enabled or pd.ep_enabled:
    apply_moe_ep_tp(model, tp_mesh=None, ep_mesh=pd.get_optional_mesh("ep"), etp_mesh=None,
                    ep_etp_mesh=None)
AC = cfg.get("ac", "none")
if AC != "none":
    apply_ac(model, ActivationCheckpoint(mode=AC, preserve_rng_state=False))
if pd.fsdp_enabled or pd.ep_enabled:
    apply_fsdp(model, pd.get_mesh(["fsdp"]), param_dtype=torch.float32, reduce_dtype=torch.float32,
               pp_enabled=False, ep_degree=pd.ep, edp_mesh=pd.get_optional_mesh(["efsdp"]),
               gradient_divide_factor=pd.fsdp_gradient_divide_factor)
    if cfg.get("force_sum", True):
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
opt = build_optimizers_with_moe_load_balancing(
    [model], OptimizerConfig(name="AdamW", lr=8e-4, implementation="foreach"), pd)
setup = counter()[0] - base
out = {"rank": rank, "ep": EP, "dp_shard": pd.dp_shard, "ac": AC, "batch": B, "seq": S,
       "experts_impl": "grouped_mm" if GROUPED else "for_loop", "data_seed": cfg.get("data_seed", 0),
       "data": "trainer" if TRAINER_DATA else "reference",
       "setup": setup, "steps": []}
inp = labels = loss = None
for step in range(cfg.get("steps", 3)):
    opt.zero_grad()
    dist.barrier()
    ROUTE.clear()
    lib.mp_reset_peak(0)
    s0 = counter()[0]
    lib.mp_set_channel(2)
    if TRAINER_DATA:
        toks = synthetic_tokens(SEED, step, B * world, S, V)[rank * B:(rank + 1) * B].clone()
    else:
        g = torch.Generator().manual_seed(100000 * cfg.get("data_seed", 0) + 1000 * step + rank)
        toks = torch.randint(0, V, (B, S + 1), generator=g)
    lib.mp_set_channel(0)
    inp, labels = toks[:, :-1].clone(), toks[:, 1:].clone()
    pred = model(inp)
    loss = F.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1))
    del pred
    f_end, f_peak = counter()
    route_fwd = list(ROUTE)
    lib.mp_reset_peak(0)
    loss.backward()
    b_end, b_peak = counter()
    lib.mp_reset_peak(0)
    opt.step()
    o_end, o_peak = counter()
    rec = {k: v - base for k, v in dict(start=s0, fwd_peak=f_peak, fwd_end=f_end, bwd_peak=b_peak, bwd_end=b_end,
                                        opt_peak=o_peak, end=o_end, peak=max(f_peak, b_peak, o_peak)).items()}
    rec["loss"] = loss.item()
    rec["recv"] = [r for r, _ in route_fwd[:L]]
    rec["padded"] = [p for _, p in route_fwd[:L]]
    out["steps"].append(rec)
    dist.barrier()
if cfg.get("out"):
    with open(f"{cfg['out']}.r{rank}.json", "w") as f:
        json.dump(out, f)
print("MPEP " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
