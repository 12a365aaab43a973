"""The served models: loaded once at start-up, run off the event loop, optionally micro-batched.

Every variant folder under the model directory (``runs/<id>/serving/``, written by
``mammofl compress``) is loaded with its sha256 checked, and only with its model card
(`server.model_card`) whose privacy checks passed -- unless the operator starts the service
with ``allow_unchecked_models``, which is logged as a warning for each such variant. Only variants that preprocess the
whole image ("full") are served: an "roi" variant needs lesion masks that an upload lacks.

Model calls run on a small thread pool (``inference_workers``); with ``micro_batch_size`` > 1,
requests that arrive within ``micro_batch_wait_ms`` of each other share one forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.data.images import preprocess
from common.errors import ConfigError, ModelError
from server.model_card import read_card
from server.compression.serving import (
    METADATA_FILE,
    ServingModel,
    load_serving_model,
    read_metadata,
)

logger = logging.getLogger(__name__)
PREFERRED_DEFAULT = "fp32"


@dataclass(frozen=True)
class Inference:
    """One image's result: probabilities by class name, and the time preprocessing and model took."""

    probabilities: dict[str, float]
    latency_ms: float


class VariantNotFoundError(ModelError):
    """A request named a variant that is not served."""


class ModelRegistry:
    """The loaded serving variants, and the way requests reach them."""

    def __init__(self, models: dict[str, ServingModel], default: str, *, workers: int = 1,
                 micro_batch_size: int = 1, micro_batch_wait_ms: float = 2.0,
                 cards: dict[str, dict | None] | None = None) -> None:
        if default not in models:
            raise ConfigError(f"default variant {default!r} is not loaded; loaded: {', '.join(sorted(models)) or 'none'}")
        self.models = models
        self.cards = {name: (cards or {}).get(name) for name in models}
        self.default = default
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._batchers = {name: MicroBatcher(model, self._executor, micro_batch_size, micro_batch_wait_ms / 1000)
                          for name, model in models.items()} if micro_batch_size > 1 else {}

    def model(self, variant: str | None) -> ServingModel:
        name = self.default if variant is None else variant
        if name not in self.models:
            raise VariantNotFoundError(f"variant {name!r} is not served; valid: {', '.join(sorted(self.models))}")
        return self.models[name]

    async def predict(self, variant: str | None, image: np.ndarray) -> Inference:
        """Preprocesses ``image`` (float32 HxW in [0, 1]) and runs the variant, off the event loop."""
        model = self.model(variant)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        batcher = self._batchers.get(model.metadata.variant)
        if batcher is None:
            probabilities = await loop.run_in_executor(self._executor, predict_one, model, image)
        else:
            batch = await loop.run_in_executor(self._executor, model_input, model, image)
            probabilities = await batcher.submit(batch[0])
        latency_ms = (time.perf_counter() - started) * 1000
        names = model.metadata.class_names
        return Inference({name: float(value) for name, value in zip(names, probabilities)}, latency_ms)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def predict_one(model: ServingModel, image: np.ndarray) -> np.ndarray:
    """The variant's probabilities for one image: preprocessing and forward pass in one call."""
    return model.predict(model_input(model, image))[0]


def model_input(model: ServingModel, image: np.ndarray) -> np.ndarray:
    """The batch of one [1, 1, S, S] the variant expects."""
    size = model.metadata.preprocessing.image_size
    return preprocess(image, size)[None, None]


class MicroBatcher:
    """Gathers concurrent requests for one model into batches of up to ``max_batch``.

    The first request of a batch waits at most ``max_wait_s`` for company; a batch then runs as
    one ``predict`` call on the executor and each request gets its own row back.
    """

    def __init__(self, model: ServingModel, executor: ThreadPoolExecutor, max_batch: int, max_wait_s: float) -> None:
        self._model = model
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: np.ndarray) -> np.ndarray:
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not asyncio.get_running_loop():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            deadline = loop.time() + self._max_wait_s
            while len(pending) < self._max_batch:
                try:
                    pending.append(await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            batch = np.stack([item for item, _ in pending])
            try:
                rows = await loop.run_in_executor(self._executor, self._model.predict, batch)
            except Exception as error:  # noqa: BLE001 - handed to every waiting request, not swallowed
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            for row, (_, future) in zip(rows, pending):
                if not future.done():
                    future.set_result(row)


def checked_card(folder: Path, *, allow_unchecked: bool) -> dict | None:
    """The variant's model card; ConfigError without one or with failed privacy checks, unless allowed."""
    try:
        card = read_card(folder)
    except ModelError as error:
        if not allow_unchecked:
            raise ConfigError(f"variant {folder.name!r}: {error}; a model is served with its card (or start the "
                              "service with MAMMOFL_API_ALLOW_UNCHECKED_MODELS=true / --allow-unchecked-models)") from None
        logger.warning("serving variant %s WITHOUT a model card (allow_unchecked_models is on): %s", folder.name, error)
        return None
    served = read_metadata(folder).sha256
    if card.get("model", {}).get("sha256") != served:
        # A card describes one model file: a file replaced after its card was written is another model.
        raise ConfigError(f"variant {folder.name!r}: its model card describes a model of sha256 "
                          f"{str(card.get('model', {}).get('sha256'))[:16]}..., not the served file "
                          f"({served[:16]}...); rewrite the card with `mammofl model-card RUN_DIR`")
    checks = card["privacy_checks"]
    if not checks["passed"]:
        reasons = "; ".join(checks["failures"])
        if not allow_unchecked:
            raise ConfigError(f"variant {folder.name!r}: its model card says its privacy checks failed ({reasons}); "
                              "it is not served (override: --allow-unchecked-models)")
        logger.warning("serving variant %s whose privacy checks FAILED (allow_unchecked_models is on): %s",
                       folder.name, reasons)
    return card


def load_registry(model_dir: Path, *, variants: tuple[str, ...] | None = None, default: str | None = None,
                  threads: int | None = None, workers: int = 1, micro_batch_size: int = 1,
                  micro_batch_wait_ms: float = 2.0, allow_unchecked: bool = False) -> ModelRegistry:
    """Loads the chosen (else every servable) variant under ``model_dir``; ConfigError when none is."""
    if threads is not None:
        torch.set_num_threads(threads)
    folders = sorted(path.parent for path in Path(model_dir).glob(f"*/{METADATA_FILE}"))
    available = {folder.name: folder for folder in folders}
    if variants is not None:
        missing = sorted(set(variants) - set(available))
        if missing:
            raise ConfigError(f"model directory {model_dir} lacks variant(s) {', '.join(missing)}; "
                              f"it holds {', '.join(sorted(available)) or 'none'} (run `mammofl compress`)")
        available = {name: available[name] for name in variants}
    models, cards = {}, {}
    for name, folder in available.items():
        mode = read_metadata(folder).preprocessing.mode
        if mode != "full":
            if variants is not None:
                raise ConfigError(f"variant {name!r} preprocesses with mode {mode!r}; only 'full' variants can "
                                  f"be served (an upload has no lesion masks)")
            logger.warning("skipping variant %s: preprocessing mode %s cannot be served", name, mode)
            continue
        cards[name] = checked_card(folder, allow_unchecked=allow_unchecked)
        models[name] = load_serving_model(folder, threads=threads)
    if not models:
        raise ConfigError(f"model directory {model_dir} holds no servable variant; point model_dir at a "
                          f"runs/<id>/serving folder written by `mammofl compress`")
    chosen = default or (PREFERRED_DEFAULT if PREFERRED_DEFAULT in models else min(models))
    return ModelRegistry(models, chosen, workers=workers, micro_batch_size=micro_batch_size,
                         micro_batch_wait_ms=micro_batch_wait_ms, cards=cards)
