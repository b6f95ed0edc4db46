"""``light_preprocessor``: what the CPU decode tasks get instead of the expert. It must equal
``expert.preprocess`` bit for bit and carry no weights, or it is refused (None) and the actor decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrea.extract.experts.registry import EXPERTS, ExpertConfig, default_variant
from astrea.extract.pipeline import MAX_PREPROCESSOR_BYTES, decode_one, light_preprocessor


def _probe():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8))


class _Scaled:
    """An expert whose preprocess scales by a constant; a model (weights) hangs beside it."""

    def __init__(self, model_in_preprocess: bool = False):
        self.model = torch.nn.Linear(4, 4)
        self.scale = 2.0
        self.model_in_preprocess = model_in_preprocess

    def preprocess(self, image):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) * self.scale
        if self.model_in_preprocess:  # needs the weights: a stripped copy cannot reproduce it
            x = x + float(self.model.weight.detach().sum())
        return x


def test_a_copy_without_the_weights_is_used_when_it_reproduces_preprocess():
    import ray.cloudpickle as cloudpickle

    expert = _Scaled()
    light = light_preprocessor(expert)
    assert light is not None and light.__self__.model is None  # the weights stayed behind
    assert expert.model is not None  # the expert itself is untouched
    assert torch.equal(light(_probe()), expert.preprocess(_probe()))
    assert len(cloudpickle.dumps(light)) < len(cloudpickle.dumps(expert.preprocess))


def test_a_preprocess_that_needs_the_weights_stays_in_the_actor():
    assert light_preprocessor(_Scaled(model_in_preprocess=True)) is None


def test_an_nn_module_expert_is_not_stripped():
    class ModuleExpert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 3)

        def preprocess(self, image):
            return torch.from_numpy(np.asarray(image, dtype=np.float32))

    assert light_preprocessor(ModuleExpert()) is None


class _Offers:
    def __init__(self, pre):
        self._pre = pre

    def preprocess(self, image):
        return _scale_by_one(image)

    def preprocessor(self):
        return self._pre


def _scale_by_one(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


class _Bulky:
    """A preprocessor that drags a large table along (as a hidden reference to weights would)."""

    def __init__(self, nbytes: int):
        self.table = np.zeros(nbytes, np.uint8)

    def __call__(self, image):
        return _scale_by_one(image)


def test_an_offered_preprocessor_is_checked_and_its_size_bounded():
    assert light_preprocessor(_Offers(_scale_by_one)) is _scale_by_one
    assert light_preprocessor(_Offers(lambda img: _scale_by_one(img) + 1)) is None  # not equal: refused
    small = _Bulky(1024)
    assert light_preprocessor(_Offers(small)) is small
    assert light_preprocessor(_Offers(_Bulky(MAX_PREPROCESSOR_BYTES + 1))) is None  # would ship to every task


@pytest.mark.parametrize("name", EXPERTS.names())
def test_every_expert_gets_a_light_preprocessor_equal_to_its_own(name):
    """The registry's experts all decode in CPU tasks; the report would otherwise say the actor decodes."""
    import ray.cloudpickle as cloudpickle

    expert = ExpertConfig(name, arch=default_variant(name, True)).build({})
    light = light_preprocessor(expert)
    assert light is not None
    assert len(cloudpickle.dumps(light)) <= MAX_PREPROCESSOR_BYTES
    a, b = decode_one(_png_bytes(), expert.preprocess), decode_one(_png_bytes(), cloudpickle.loads(cloudpickle.dumps(light)))
    assert a[1] is None and b[1] is None and np.array_equal(a[0], b[0])


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    _probe().save(buf, format="PNG")
    return buf.getvalue()


def test_decode_one_turns_bad_input_into_a_reason_not_an_exception():
    def broken(image):
        raise KeyError("a preprocess bug")

    arr, err = decode_one(b"not an image", _scale_by_one)
    assert arr is None and err.startswith("undecodable")
    arr, err = decode_one(_png_bytes(), broken)
    assert arr is None and err == "preprocess failed: KeyError: a preprocess bug"
    arr, err = decode_one(_png_bytes(), _scale_by_one)
    assert err is None and arr.dtype == np.float32 and arr.flags.c_contiguous and arr.shape == (3, 70, 90)
