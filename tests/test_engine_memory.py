"""Peak RSS of ``dppa merge`` does not grow with the model: a 2x deeper model costs ~no more."""

from __future__ import annotations

import subprocess
import sys

from engine_util import ROOT, family, write_config

SNIPPET = """
import resource, sys
from dppa_kernels.engine import MergeOptions, run_merge
run_merge(sys.argv[1], MergeOptions(out=sys.argv[2], progress=False, shard_size=20_000_000, backend=sys.argv[3]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak(cfg, out, backend):
    r = subprocess.run([sys.executable, "-c", SNIPPET, cfg, str(out), backend], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


def test_peak_rss_flat_when_model_doubles(tmp_path):
    """ties: pure streaming. dppa: the same plus its whole-model statistics, one 32768-bin
    histogram per (model, unit), which scale with the unit count, not with bytes."""
    shape = dict(hidden=512, inter=1024, vocab=512, shard_bytes=16_000_000)
    peaks = {}
    fams = {layers: family(tmp_path / f"f{layers}", layers=layers, **shape) for layers in (4, 8)}
    extra_input = 4 * 4 * (4 * 512 * 512 + 3 * 512 * 1024) * 2  # bytes added to the 4 models
    for method in ("ties", "dppa"):
        for layers, (base, fts) in fams.items():
            cfg = write_config(tmp_path / f"{method}{layers}.yaml", method, base, fts,
                               model_params=[{"weight": 1.0, "density": 0.2}] * 3 if method == "ties" else None)
            peaks[method, layers] = _peak(cfg, tmp_path / f"o-{method}{layers}", "auto")
        growth = peaks[method, 8] - peaks[method, 4]
        print(f"{method}: peak RSS {peaks[method, 4] / 2**20:.0f} MiB -> {peaks[method, 8] / 2**20:.0f} MiB "
              f"while the inputs grew by {extra_input / 2**20:.0f} MiB")
        hist_budget = 0 if method == "ties" else 4 * 7 * 3 * 32768 * (4 + 8)  # int32 kept + int64 in allocation
        assert growth < 0.1 * extra_input + hist_budget, (method, peaks)
