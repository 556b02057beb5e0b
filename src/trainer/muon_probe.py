"""Per-matrix working set of torch.optim.Muon's step (torch 2.11, CPU), counted by memplan's shim allocator.

    MUON_THREADS=1 OMP_NUM_THREADS=1 /tmp/hf-venv/bin/python src/trainer/muon_probe.py /tmp/shim.so [trace]   (MUON_THREADS: torch threads; the
    scratch of CPU bf16 GEMMs depends on it; the qlora_torch_2.11.jsonl records were made with 2)

For each shape (rows, cols) a fp32 parameter with a gradient and a momentum buffer (after one warm-up step) is stepped
by torch.optim.Muon(lr=2e-2, weight_decay=0, momentum=0.95, nesterov=True) alone; prints the step's peak over its
start. With "trace", also every allocation/free (bytes, op from a TorchDispatchMode) of the step."""
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
import torch
import os
torch.set_num_threads(int(os.environ.get("MUON_THREADS", "1")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_shim import install_counter, OpTrace
counter = install_counter(lib)
TRACE = len(sys.argv) > 2 and sys.argv[2] == "trace"
shapes = [(64, 64), (176, 64), (64, 176), (256, 64), (256, 256), (688, 256), (256, 688), (2048, 256), (100, 30), (30, 100)]
res = []
for (p, q) in shapes:
    lib.mp_set_channel(0)
    w = torch.nn.Parameter(torch.randn(p, q))
    w.grad = torch.randn(p, q)
    opt = torch.optim.Muon([w], lr=2e-2, weight_decay=0.0, momentum=0.95, nesterov=True)
    opt.step()  # creates momentum_buffer
    lib.mp_reset_peak(0)
    c0 = counter()[0]
    ev = None
    if TRACE:
        phase, oplog = ["opt"], []
        tr = OpTrace(lib, torch.nn.Module(), phase, oplog)
        lib.mp_trace_start()
        m = tr.mode(); m.__enter__()
    opt.step()
    if TRACE:
        m.__exit__(None, None, None)
        lib.mp_trace_stop()
        ev = tr.take_events()
        who = tr.owners()
        rows = []
        for i, (k, aid, nb, tag) in enumerate(ev):
            w_ = who.get(i, ("-", "-", "?", []))
            rows.append(("A" if k == 0 else "F", nb if k == 0 else aid, w_[2], str(w_[3][:1])))
    c1, pk = counter()
    m_ = min(p, q)
    pred = 8 * p * q + 4 * m_ * m_
    r = {"shape": [p, q], "peak_over_start": pk - c0, "end_over_start": c1 - c0, "pred_8pq_4m2": pred}
    if TRACE:
        r["events"] = rows
    res.append(r)
    print(json.dumps(r), flush=True)
    del opt, w
