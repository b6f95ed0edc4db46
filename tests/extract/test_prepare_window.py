"""The actor's post-forward work done per window (``prepare_window``) stores exactly what the per-image
path (``prepare_output`` + the writer's own checks) stored: same bits, same failures, same reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrea.extract.experts.base import ExpertOutput
from astrea.extract.worker import prepare_output, prepare_window
from tests.shards.helpers import make_spec


def _outputs(spec, n: int, seed: int = 0) -> list[ExpertOutput]:
    rng = np.random.default_rng(seed)
    return [ExpertOutput(rng.normal(0, 3, (spec.num_tokens, spec.token_dim)).astype(np.float32),
                         rng.normal(0, 1, spec.pooled_dim).astype(np.float32), {"i": i}) for i in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_same_bits_as_the_per_image_path(dtype, as_tensor):
    spec = make_spec(dtype=dtype)
    outs = _outputs(spec, 5)
    results: list = list(outs)
    if as_tensor:  # what an expert that leaves its outputs on the device hands over
        results = [ExpertOutput(torch.from_numpy(o.tokens), torch.from_numpy(o.pooled), o.outputs) for o in outs]
    results[2] = "undecodable: test"
    prepared, err = prepare_window(spec, results, measure=True)
    assert prepared[2] == "undecodable: test"
    for i, o in enumerate(outs):
        if i == 2:
            continue
        t, p, out, finite = prepared[i]
        rt, rp, rout, rerr = prepare_output(spec, o, measure=(i == 0))
        assert finite and out == rout
        assert t.dtype == rt.dtype and np.array_equal(t.view(np.uint8), np.ascontiguousarray(rt).view(np.uint8))
        assert np.array_equal(p.view(np.uint8), np.ascontiguousarray(rp).view(np.uint8))
        if i == 0:
            assert err == rerr


def test_nonfinite_and_overflow_fail_only_their_key_with_the_same_reason():
    spec = make_spec(dtype="float16")
    outs = _outputs(spec, 4)
    outs[1].tokens[0, 0] = np.nan
    outs[3].pooled[2] = 1e6  # float16 overflow
    prepared, _ = prepare_window(spec, outs)
    for i in (1, 3):
        with pytest.raises(ValueError) as e:
            prepare_output(spec, outs[i], False)
        assert prepared[i] == f"bad expert output: ValueError: {e.value}"
    assert "non-finite" in prepared[1] and "overflow float16" in prepared[3]
    assert all(isinstance(prepared[i], tuple) for i in (0, 2))


def test_bad_shapes_and_outputs_fail_their_key():
    spec = make_spec(dtype="float16")
    outs = _outputs(spec, 3)
    outs[0] = ExpertOutput(outs[0].tokens[:-1], outs[0].pooled, {})
    outs[1] = ExpertOutput(outs[1].tokens, outs[1].pooled, {"x": float("nan")})
    prepared, _ = prepare_window(spec, outs)
    assert prepared[0].startswith("bad expert output: ValueError: shapes tokens")
    assert "strict JSON" in prepared[1] and isinstance(prepared[2], tuple)
