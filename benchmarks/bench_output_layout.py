"""benchmarks/bench_output_layout.py -- in one process, alternating: the C++ forward writing [B,H,L,D] then transposing+copying
to [B,L,H,D] (before) vs writing straight into [B,L,H,D] storage (after). 9/3 heads, D=64, L=4096."""
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from gape._io import write_results_json
from gape._threads import set_threads
from gape.kernels import attention_cpu
from gape.core.torch_backend import _kernel_args
set_threads(1)
assert attention_cpu.available(), attention_cpu.unavailable_reason()
B, HQ, HKV, L, D = 1, 9, 3, 4096, 64
q = torch.randn(B, L, HQ, D).transpose(1, 2); k = torch.randn(B, HKV, L, D); v = torch.randn(B, HKV, L, D)
lam = torch.rand(B, HQ, L) * 0.1; pi = torch.rand(B, HKV, L)
args = _kernel_args(q, k, v, lam, pi, None, True, "log")
def before():
    o = attention_cpu.attention_forward(*args, True, 0.125)
    return o.transpose(1, 2).contiguous()
def after():
    o = torch.empty(B, L, HQ, D).transpose(1, 2)
    o = attention_cpu.attention_forward(*args, True, 0.125, out=o)
    return o.transpose(1, 2).contiguous()
torch.testing.assert_close(before(), after())
tb, ta = [], []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
    for fn, acc in ((before, tb), (after, ta)) if i % 2 == 0 else ((after, ta), (before, tb)):
        t0 = time.perf_counter(); fn(); acc.append(time.perf_counter() - t0)
row = dict(date=datetime.datetime.utcnow().isoformat(timespec="seconds"), machine=platform.node(), torch=torch.__version__,
           threads=1, shape=f"B{B}-H{HQ}/{HKV}-L{L}-D{D}", before_median_s=statistics.median(tb), after_median_s=statistics.median(ta),
           ratio_after_to_before=statistics.median(ta) / statistics.median(tb), loadavg=open("/proc/loadavg").read().split()[0])
print(json.dumps(row))
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_output_layout", "bench_output_layout.json")
write_results_json(out, row)
