"""Makes tests/data/ep2_trainer_data_torch_2.11.jsonl: ep_reference.py (next to this file) with
"data": "trainer" on two ranks, tiny-moe, dp_shard 2 = ep 2, fp32, AC none and full, three steps, each plan
run three times. Per rank and phase the least of the runs is kept: on CPU/Gloo the reference's work objects
now and then keep a dispatch's buffers alive a little longer (each run's excess is kept in `above_min`).
Losses and the rows each layer received must agree between runs.

    python src/trainer/ep_records.py /tmp/shim.so > tests/data/ep2_trainer_data_torch_2.11.jsonl

with the python of the venv that holds torchtitan 0.2.2 and torch 2.11 (see ep_reference.py).
"""
import json, os, random, subprocess, sys, tempfile
plans = [(1,128,"none"),(2,64,"none"),(2,128,"none"),(1,128,"full"),(2,64,"full"),(2,128,"full")]
RUNS = 3
out = []
for b, s, ac in plans:
    best = None
    for run in range(RUNS):
        o = os.path.join(tempfile.mkdtemp(), f"ep2-{b}-{s}-{ac}-{run}")
        cfg = json.dumps({"batch": b, "seq": s, "ep": 2, "ac": ac, "steps": 3, "data": "trainer", "out": o})
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={29700 + random.randrange(200)}", "ep_reference.py", sys.argv[1], cfg],
                       cwd=os.path.dirname(os.path.abspath(__file__)),
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
        ranks = [json.load(open(f"{o}.r{r}.json")) for r in (0, 1)]
        st = [d["steps"][-1] for d in ranks]
        phases = [[x["fwd_peak"], x["bwd_peak"], x["opt_peak"]] for x in st]
        cur = {"recv": [x["recv"] for x in st], "losses": [[y["loss"] for y in d["steps"]] for d in ranks], "phases": phases}
        if best is None:
            best = cur
            best["all"] = [phases]
        else:
            assert cur["recv"] == best["recv"] and cur["losses"] == best["losses"]
            best["all"].append(phases)
            best["phases"] = [[min(a, c) for a, c in zip(pa, pc)] for pa, pc in zip(best["phases"], phases)]
    rec = {"model": "tiny-moe", "ep": 2, "dp_shard": 2, "ac": ac, "batch": b, "seq": s, "data": "trainer",
           "seed": 0, "lr": 8e-4, "steps": 3,
           "measured": [max(p) for p in best["phases"]], "phases": best["phases"],
           "recv_rows": best["recv"], "losses": best["losses"], "runs": RUNS,
           "above_min": [[[v - m for v, m in zip(pr, mr)] for pr, mr in zip(run, best["phases"])] for run in best["all"]]}
    print(json.dumps(rec), flush=True)
