import json, sys, re, collections
r = json.load(open(sys.argv[1]))
print("stage", r["stage"], "peak_rel", r["peak_rel"], "peak alloc tag:", r["peak_alloc_tag"], "event", r["peak_event"], "/", r["n_events"])
groups = collections.defaultdict(lambda: [0, 0, collections.Counter()])
tot = 0
for idn, by, lab, tg in r["items"]:
    tot += by
    if lab == "?":
        key = "UNLABELED alloc@" + re.sub(r"\d+", "#", tg.split("|")[0]) + "|" + (tg.split("|")[1] if "|" in tg else "")
        det = f"{by}"
    else:
        parts = lab.split(" ")
        kind = parts[0]
        # strip mb index for grouping
        key = re.sub(r"mb\d+", "mb*", " ".join(parts[:-1]))
        det = parts[-1] + f"={by}"
    g = groups[key]; g[0] += by; g[1] += 1; g[2][det] += 1
print("total", tot)
for k, (b, n, c) in sorted(groups.items(), key=lambda x: -x[1][0]):
    print(f"{b:>10} {n:>4}  {k}   {dict(c.most_common(6))}")
