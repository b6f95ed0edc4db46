"""``astrea generate RUN``: one answer about one image, from the store or from an image file.

Above both ``astrea.train`` (the run, the model, greedy/sampled decoding: :mod:`astrea.train.generate`) and
``astrea.extract`` (an image file's features computed online by the run's experts:
:mod:`astrea.extract.online`); the CLI, :func:`astrea.api.generate` and the demo call :func:`run_generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from astrea.train.errors import TrainError
from astrea.train.generate import GenerateOptions, answer_stage, generate, stored_features


@dataclass
class GenerateConfig:
    """``astrea generate RUN``: one answer about one image, from the store (``key``) or a file (``image``)."""

    run: str
    prompt: str
    key: str = ""  # an image of the store (dataset ``data``, default: the run's own)
    image: str = ""  # an image file: the run's experts are rebuilt and run online (astrea.extract.online)
    data: str = ""
    store: str = ""  # the store moved since training: its new path
    device: str = "auto"
    weights: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if bool(self.key) == bool(self.image):
            raise TrainError("generate: give exactly one image, --key KEY (from the store) or --image PATH")
        if not self.prompt.strip():
            raise TrainError("generate: --prompt is empty")
        self.options().validate()

    def options(self) -> GenerateOptions:
        return GenerateOptions(self.max_new_tokens, self.temperature, self.top_p, self.seed)


def run_generate(gcfg: GenerateConfig, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the run, get the image's features, generate; returns the answer and what it was made from."""
    from astrea.train.loaded_run import load_run
    from astrea.train.instructions import prompt_text

    gcfg.validate()
    lr = load_run(gcfg.run, device=gcfg.device, store=gcfg.store, weights=gcfg.weights)
    stage = answer_stage(lr.stages)
    experts = stage.required_experts()
    fps = {**lr.info.get("experts", {}), **lr.cfg.expected_fingerprints}
    dataset = gcfg.data or lr.cfg.data
    if gcfg.key:
        features = stored_features(lr.cfg.store, dataset, experts, gcfg.key, fps)
        source = f"store {lr.cfg.store}/{dataset} key {gcfg.key}"
    else:
        from astrea.extract.online import online_features

        features = online_features(lr.cfg.store, dataset, experts, gcfg.image, fps, device=gcfg.device)
        source = f"image {gcfg.image} (experts run online)"
    prompt = prompt_text([("user", gcfg.prompt)], lr.model.tokenizer, lr.cfg.instructions.template)
    answer = generate(lr.model, stage, features, prompt, gcfg.options(), key=gcfg.key or gcfg.image, on_text=on_text)
    random = bool(lr.info.get("llm", {}).get("random_weights")) or any(lr.info.get("experts_random_weights", {}).values())
    return {"answer": answer, "prompt": gcfg.prompt, "source": source, "stage": stage.name,
            "weights": lr.weights, "random_weights": random}
