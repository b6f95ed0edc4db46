"""The snippets in docs/store.md read a store with plain zarr / webdataset / tarfile, without astrea.

The snippets run in a fresh interpreter against stores written here; the test then checks that astrea
was never imported and that the snippet's ``feats`` / ``failed`` equal what astrea reads.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.shards.helpers import keys_of, make_spec, write_unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "store.md"
PLACEHOLDER = "STORE/DATASET/EXPERT@FINGERPRINT"

CASES = [("zarr", "zarr", "float16"), ("zarr", "zarr", "bfloat16"), ("webdataset", "wds", "float16"),
         ("webdataset", "wds", "bfloat16"), ("tarfile", "wds", "float32"), ("zarr", "zarr", "int8"),
         ("webdataset", "wds", "int8"), ("tarfile", "wds", "int8")]

# Runs every case in one fresh interpreter (one start-up instead of five), each snippet in its own namespace.
RUNNER = '''
import hashlib, json, sys
import numpy as np
cases = json.loads(sys.argv[1])
out = {}
def h(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()
for case, code in cases.items():
    ns = {"__name__": "snippet"}
    exec(compile(code, case, "exec"), ns)
    out[case] = {"feats": {k: [h(t), list(t.shape), h(p), o] for k, (t, p, o) in ns["feats"].items()},
                 "failed": ns["failed"]}
out["astrea_imported"] = [m for m in sys.modules if m == "astrea" or m.startswith("astrea.")]
print(json.dumps(out))
'''


def snippet(name: str) -> str:
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"docs/store.md has no snippet {name!r}"
    return m.group(1)


def _h(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def test_doc_snippets_read_the_store_without_astrea(store, tmp_path):
    bad = keys_of("00000", 7)[3]
    cases, edirs = {}, {}
    for name, fmt, dtype in CASES:
        case = f"{name}-{fmt}-{dtype}"
        edir = store.expert_dir("ds", make_spec(f"e_{fmt}_{dtype}", fmt=fmt, dtype=dtype), create=True)
        if not edir.is_committed("00000"):
            write_unit(edir, "00000", 7, failed={bad})
        code = snippet(name)
        assert PLACEHOLDER in code, f"snippet {name} lost its placeholder path"
        cases[case], edirs[case] = code.replace(PLACEHOLDER, str(edir.path)), edir
    script = tmp_path / "read.py"
    script.write_text(RUNNER)
    # -I: no cwd on sys.path, no PYTHON* variables; the venv's packages (zarr, webdataset) stay visible
    res = subprocess.run([sys.executable, "-I", str(script), json.dumps(cases)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got.pop("astrea_imported") == []
    for case, edir in edirs.items():
        want = {r.key: [_h(r.tokens), list(r.tokens.shape), _h(r.pooled), r.outputs]
                for r in edir.iter_unit("00000", include_failed=False)}
        assert got[case]["feats"] == want and len(want) == 6, case
        assert list(got[case]["feats"]) == [k for k in keys_of("00000", 7) if k != bad], case  # source order
        assert list(got[case]["failed"]) == [bad] and got[case]["failed"][bad].startswith("undecodable"), case
