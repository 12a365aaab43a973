"""REST service benchmark: upload+predict (``POST /v1/predict``) under load, against the bare model.

For each serving variant (default fp32 and int8_dynamic), a load generator (httpx, asyncio) sends
the same synthetic DICOM mammogram at concurrency 1, 8 and 32 to a real uvicorn server in this
process (embedded SQLite store, de-identification, encryption, storage, inference: the whole
path), and prints p50/p95/p99 latency and requests/s beside the bare model forward time on the
same preprocessed input, which is the limit. Aim: at concurrency 1 the service adds at most 25 %
to bare inference time (the printed ratio p50 / bare <= 1.25). A second row per cell predicts on an
image stored beforehand (``POST /v1/images/{id}/predictions``: fetch, decrypt, decode, preprocess,
infer, store the prediction), which separates the service's own cost from de-identification.

    .venv/bin/python bench/rest_service.py [--serving RUN_DIR/serving | --encoder resnet18 --input-size 224]
        [--variants fp32 int8_dynamic] [--requests 64] [--concurrency 1 8 32] [--image-size 256]
        [--threads 1] [--micro-batch 1]

Without --serving it uses the newest runs/*/serving that holds the variants asked for. The demo
runs serve a tiny model whose forward pass costs less than an HTTP round trip, so the ratio says
little there; ``--encoder`` serves an untrained fp32 model of that registry encoder at
``--input-size`` px instead (weights do not change the cost), so that the 25 % aim is measured
where it means something.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import torch
import uvicorn

from anonymize.secret import create_secret
from api.app import create_app
from api.crypto import create_key
from api.inference import model_input
from api.settings import ApiSettings
from api.uploads import DICOM_TYPE, decode_image
from common.data.synthetic_dicom import synthesize_dataset
from common.models.classifier import CLASS_NAMES, build_classifier
from server.compression.model_files import write_pytorch_model
from server.compression.serving import (
    Preprocessing,
    ServingMetadata,
    SourceRun,
    load_serving_model,
    sha256_of,
    write_metadata,
)

MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"
AIM_RATIO = 1.25
UPLOAD_NOTE = " (includes de-identification and storing, a cost of their own)"


def newest_serving(variants: list[str]) -> Path:
    candidates = sorted(Path("runs").glob("*/serving"), key=lambda path: path.stat().st_mtime, reverse=True)
    for candidate in candidates:
        if all((candidate / name / "metadata.json").is_file() for name in variants):
            return candidate
    raise SystemExit(f"no runs/*/serving holds {', '.join(variants)}; run `mammofl compress RUN_DIR` or pass --serving")


def untrained_serving(root: Path, encoder: str, input_size: int) -> Path:
    """``serving/fp32`` of an untrained classifier on ``encoder``, laid out as `mammofl compress` does."""
    serving = root / "serving"
    model_file = serving / "fp32" / "model.pt"
    model_file.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_classifier(encoder, norm="batch").eval()
    spec = {"encoder": encoder, "norm": "batch", "dropout": 0.2, "num_classes": len(CLASS_NAMES)}
    write_pytorch_model(model, spec, "fp32", model_file)
    write_metadata(model_file.parent, ServingMetadata(
        variant="fp32", backend="pytorch", precision="fp32", pruning="none", model_file=model_file.name,
        sha256=sha256_of(model_file), class_names=CLASS_NAMES,
        preprocessing=Preprocessing(mode="full", image_size=input_size), metrics={},
        source_run=SourceRun(run_id=f"bench-untrained-{encoder}", checkpoint="none", checkpoint_sha256="0" * 64)))
    return serving


def mammogram(root: Path, size: int) -> bytes:
    synthesize_dataset(root / "data", sites=1, per_site=2, size=size, seed=3, burned_in_text=0.0)
    for path in sorted((root / "data").rglob("*.dcm")):
        if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY:
            return path.read_bytes()
    raise SystemExit("the synthetic generator wrote no mammogram")


def bare_forward_ms(variant_dir: Path, dicom: bytes, threads: int, runs: int = 50) -> float:
    """Median forward time of the served model on the preprocessed input: the service's limit."""
    model = load_serving_model(variant_dir, threads=threads)
    batch = model_input(model, decode_image(dicom, DICOM_TYPE))
    for _ in range(5):
        model.predict(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.predict(batch)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


class Server:
    """uvicorn serving the app in a thread of this process."""

    def __init__(self, settings: ApiSettings) -> None:
        self.app = create_app(settings)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise SystemExit("the server did not start; its error is above")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def load(url: str, api_key: str, dicom: bytes, variant: str, concurrency: int, requests: int,
               stored_image: str | None = None) -> tuple[list[float], float]:
    """Latencies (ms) of ``requests`` calls made ``concurrency`` at a time, and the wall time: upload+predict,
    or with ``stored_image`` a prediction on that stored image (no upload, no de-identification)."""
    latencies: list[float] = []
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, limits=limits,
                                 timeout=120) as client:
        async def worker() -> None:
            for _ in remaining:
                started = time.perf_counter()
                if stored_image is None:
                    response = await client.post("/v1/predict", files={"file": ("x.dcm", dicom)},
                                                 data={"variant": variant})
                else:
                    response = await client.post(f"/v1/images/{stored_image}/predictions", json={"variant": variant})
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 201:
                    raise SystemExit(f"{response.request.url.path} answered {response.status_code}: {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving", type=Path, help="a runs/<id>/serving folder (default: the newest)")
    parser.add_argument("--encoder", help="serve an untrained fp32 model of this registry encoder (e.g. resnet18) "
                                          "instead of a run's variants")
    parser.add_argument("--input-size", type=int, default=224, help="model input size in px with --encoder")
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8_dynamic"])
    parser.add_argument("--requests", type=int, default=64, help="requests per variant and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--image-size", type=int, default=256, help="rows of the synthetic DICOM uploaded")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the model (service and bare alike)")
    parser.add_argument("--micro-batch", type=int, default=1, help="micro-batch size of the service (1: off)")
    args = parser.parse_args()
    if args.encoder and args.serving:
        parser.error("--encoder builds the model to serve; it excludes --serving")
    if args.encoder:
        args.variants = ["fp32"]
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="mammofl-bench-api-") as scratch:
        root = Path(scratch)
        if args.encoder:
            serving = untrained_serving(root, args.encoder, args.input_size)
        else:
            serving = args.serving or newest_serving(args.variants)
        dicom = mammogram(root, args.image_size)
        create_key(root / "keyring.json")
        create_secret(root / "anonymize.key")
        settings = ApiSettings(sqlite_path=root / "store.sqlite", keyring_path=root / "keyring.json",
                               deidentification_secret_file=root / "anonymize.key", model_dir=serving,
                               variants=tuple(args.variants), cpu_threads=args.threads, audit_log_path=root / "audit",
                               micro_batch_size=args.micro_batch, web_dir=None,
                               # What is measured is the service's work, not its guards against abuse.
                               rate_limit_per_address=0, rate_limit_per_key=0, max_concurrent_uploads=1024)
        print(f"serving {serving}; upload: synthetic DICOM, {len(dicom)} bytes, {args.image_size} rows; "
              f"{args.threads} model thread(s), micro-batch {args.micro_batch}, {args.requests} requests per cell; "
              f"torch {torch.__version__}")
        bare = {variant: bare_forward_ms(serving / variant, dicom, args.threads) for variant in args.variants}
        server = Server(settings)
        server.start()
        try:
            api_key = server.app.state.services.keys.create("bench", "uploader", "bench").api_key
            url = f"http://127.0.0.1:{server.port}"
            stored = httpx.post(f"{url}/v1/images", files={"file": ("x.dcm", dicom)},
                                headers={"Authorization": f"Bearer {api_key}"}, timeout=120).json()["image_id"]
            print("\nrequest | variant | concurrency | p50 ms | p95 ms | p99 ms | requests/s | bare forward ms | p50 / bare")
            print("---|---|---|---|---|---|---|---|---")
            ratios = {}
            for variant in args.variants:
                for label, image in (("upload+predict", None), ("predict stored", stored)):
                    asyncio.run(load(url, api_key, dicom, variant, 1, 4, image))  # warm-up
                    for concurrency in args.concurrency:
                        latencies, wall = asyncio.run(load(url, api_key, dicom, variant, concurrency, args.requests,
                                                           image))
                        p50 = percentile(latencies, 50)
                        ratio = p50 / bare[variant]
                        if concurrency == 1:
                            ratios[(label, variant)] = ratio
                        print(f"{label} | {variant} | {concurrency} | {p50:.2f} | {percentile(latencies, 95):.2f} | "
                              f"{percentile(latencies, 99):.2f} | {len(latencies) / wall:.1f} | {bare[variant]:.2f} | "
                              f"{ratio:.2f}x")
        finally:
            server.stop()
        print("\naim: at concurrency 1 the service adds at most 25 % to bare inference (p50 / bare <= "
              f"{AIM_RATIO})")
        for (label, variant), ratio in ratios.items():
            print(f"{label} {variant}: {ratio:.2f}x bare, {(ratio - 1) * 100:+.0f} % | "
                  f"{'met' if ratio <= AIM_RATIO else 'NOT met'}{UPLOAD_NOTE if label == 'upload+predict' else ''}")


if __name__ == "__main__":
    main()
