"""``python -m pyro_sbp._native``: build the native gate kernels now and say whether they load."""

import sys
import time

from pyro_sbp import _native

start = time.perf_counter()
ok = _native.load()
took = time.perf_counter() - start
if ok:
    lanes = _native.ops().float_lanes()
    print(f"pyro-sbp native kernels: loaded ({took:.1f} s), {lanes} float32 lane(s) per vector")
else:
    print(f"pyro-sbp native kernels: not available ({_native._state['error']})", file=sys.stderr)
sys.exit(0 if ok else 1)
