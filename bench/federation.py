"""Deployment vs simulation on the same config, with and without SecAgg+: per-round wall time
and bytes on the wire per site.

The deployment is real: a SuperLink with TLS and SuperNode authentication, and one SuperNode
process per site on 127.0.0.1. Each site reaches the SuperLink through its own counting TCP
relay, so the bytes are what crossed the loopback wire (TLS records of gRPC frames, polling
and heartbeats included). The simulation moves the same messages in memory; its "bytes" are
the model payloads it hands each site (the global model down, the update up, per round).
The SecAgg+ runs are the same config with ``federation.secure_aggregation`` on, on the same
SuperLink and sites; the ratio against the plain run of the same mode is SecAgg+'s overhead.

The runs come in pairs: a simulation (beside the deployment, idle meanwhile), then the
deployment's run of the same config. On a shared 2-core machine the speed of the moment
moves both by a third from one hour to the next; the two runs of a pair see the same moment.
``--repeats N`` runs N pairs, alternating, and prints each pair's ratio and their median. A
simulation starts once the deployment's sites poll at their idle pace, and each pair says how
many cores the machine kept busy just before it (the idle deployment's polls, anything else).

    .venv/bin/python bench/federation.py [--rounds 2] [--repeats 1] [--per-site 24] [--size 64]
        [--no-secure-aggregation] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


class CountingRelay:
    """A TCP relay from a local port to `target`, counting bytes each way (asyncio, in its own thread)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.up = self.down = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _relay(self, site_reader, site_writer) -> None:
        try:
            link_reader, link_writer = await asyncio.open_connection(*self.target)
        except OSError:  # the SuperLink is gone: the bench is tearing the deployment down
            site_writer.close()
            return
        await asyncio.gather(self._pipe(site_reader, link_writer, "up"), self._pipe(link_reader, site_writer, "down"))

    async def _pipe(self, reader, writer, direction: str) -> None:
        try:
            while chunk := await reader.read(65536):
                setattr(self, direction, getattr(self, direction) + len(chunk))
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def bench_config(root: Path, rounds: int, name: str, *, secure: bool = False):
    from common.config import parse_config

    return parse_config({
        "name": name, "seed": 3, "device": "cpu", "training": "federated", "epochs": 1, "batch_size": 16,
        "learning_rate": 0.003, "num_workers": 0, "encoder": "smallcnn", "verbose": 0, "augmentation": False,
        "validation_split": 0.2, "model": {"image_size": 64},
        "data": {"source": "sites", "root": str(root / "data"), "cache_dir": str(root / "cache")},
        "federation": {"rounds": rounds, "local_epochs": 1, "min_train_sites": 3, "min_available_sites": 3,
                       "fraction_evaluate": 0.0, "secure_aggregation": secure},
        # Room for every run of the bench: the sites' state carries over from one run to the next.
        "privacy": {"enabled": True, "target_epsilon": 8.0, "budget_epsilon": 1000.0, "max_grad_norm": 1.0},
        "tracking": {"runs_dir": str(root / name / "runs"), "wandb_mode": "disabled"},
    })


def round_seconds(run_root: Path) -> list[float]:
    from common.runs import RunDirectory

    return [row["seconds"] for row in RunDirectory(run_root).read_metrics() if "round" in row]


def model_bytes(config) -> int:
    from common.models.configured import classifier_from_config

    return sum(tensor.numel() * tensor.element_size() for tensor in classifier_from_config(config).state_dict().values())


def simulation(root: Path, rounds: int, *, secure: bool, name: str) -> dict:
    from simulations.federated import simulate

    config = bench_config(root, rounds, name, secure=secure)
    started = time.perf_counter()
    result = simulate(config, log=lambda message: None)
    return {"wall_s": time.perf_counter() - started, "round_s": round_seconds(result.run.root),
            "bytes_per_site_round": 2 * model_bytes(config)}


def settled_machine_load(seconds: float = 3.0) -> float:
    """Cores the machine keeps busy while this process sleeps, once a deployment's sites have been
    idle long enough to poll at their idle pace (`common.polling`): what a simulation shares the
    machine with. Read from /proc/stat."""
    from common.polling import ACTIVE_WINDOW_S

    time.sleep(ACTIVE_WINDOW_S + 1.0)
    busy, started = _machine_busy_s(), time.perf_counter()
    time.sleep(seconds)
    return (_machine_busy_s() - busy) / (time.perf_counter() - started)


def _machine_busy_s() -> float:
    """Seconds of CPU the whole machine has spent busy since boot (0 where /proc/stat is missing)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Deployed:
    """A deployment on this machine: a SuperLink with TLS and SuperNode authentication, and one
    SuperNode per site, each through its own `CountingRelay`. `run` runs one config on it."""

    def __init__(self, root: Path, rounds: int, sites: list[str]) -> None:
        self.root, self.rounds, self.sites = root, rounds, sites

    def __enter__(self) -> "Deployed":
        from clients.site import (
            SiteNode,
            prepare_state_dir,
            shared_machine_threads,
            site_environment,
            supernode_command,
        )
        from common.certs import create_node_keys, create_tls_files
        from server.deployment import Deployment, enrol_site, free_port, spawn, start_superlink

        folder = self.root / "deployment"
        tls = create_tls_files(folder / "secrets", ["127.0.0.1"])
        self.link = Deployment(folder=folder, fleet_address=f"127.0.0.1:{free_port()}",
                               control_address=f"127.0.0.1:{free_port()}",
                               serverappio_address=f"127.0.0.1:{free_port()}", ca_certificate=tls.ca_certificate,
                               node_auth=True)
        self.processes = [start_superlink(self.link, tls)]
        self.relays: dict[str, CountingRelay] = {}
        try:
            for site_id in self.sites:
                keys = create_node_keys(folder / "secrets" / "sites", site_id)
                enrol_site(self.link, keys.public_key)
                self.relays[site_id] = CountingRelay(self.link.fleet_address)
                node = SiteNode(site_id=site_id, data_dir=self.root / "data" / site_id,
                                state_dir=folder / "state" / site_id, superlink=self.relays[site_id].address,
                                root_certificates=tls.ca_certificate, auth_private_key=keys.private_key,
                                clientappio_address=f"127.0.0.1:{free_port()}", budget_epsilon=1000.0,
                                cpu_threads=shared_machine_threads(len(self.sites)))
                prepare_state_dir(node)
                self.processes.append(spawn(supernode_command(node), folder / "logs" / f"{site_id}.log",
                                            env=site_environment(node)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        from server.deployment import stop

        for process in self.processes:
            stop(process, kill=True)

    def run(self, *, secure: bool, name: str) -> dict:
        from server.deployment import run_federation

        config_path = self.root / f"{name}.json"
        config_path.write_text(bench_config(self.root, self.rounds, name, secure=secure).model_dump_json())
        before = {site_id: (relay.up, relay.down) for site_id, relay in self.relays.items()}
        started = time.perf_counter()
        run, _ = run_federation(self.link, config_path, timeout=3600)
        wall = time.perf_counter() - started
        traffic = {site_id: (relay.up - before[site_id][0], relay.down - before[site_id][1])
                   for site_id, relay in self.relays.items()}
        return {"wall_s": wall, "round_s": round_seconds(run.root),
                "bytes_per_site_round": {site_id: (up + down) / self.rounds for site_id, (up, down) in traffic.items()},
                "up_down_per_site": traffic}


def steady_round_s(run: dict) -> float:
    """Mean round time after round 1 (which also starts a simulation's engine and virtual sites)."""
    rounds = run["round_s"][1:] or run["round_s"]
    return sum(rounds) / len(rounds)


def mean_wire(run: dict) -> float:
    return sum(run["bytes_per_site_round"].values()) / len(run["bytes_per_site_round"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--per-site", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of runs (a simulation, then the deployment, on the same config), alternating")
    parser.add_argument("--no-secure-aggregation", action="store_true", help="skip the SecAgg+ runs")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR (new or empty) and keep it: the runs, the SuperLink's and sites' logs")
    args = parser.parse_args()
    if args.sites < 3 and not args.no_secure_aggregation:
        parser.error("SecAgg+ needs at least 3 sites; give --sites 3 or more, or --no-secure-aggregation")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 or more pairs of runs")

    from common.data.synthetic_dicom import synthesize_dataset

    variants = [False] if args.no_secure_aggregation else [False, True]
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: the folder is not empty; give a new or empty one")
    pairs: dict[bool, list[tuple[dict, dict]]] = {secure: [] for secure in variants}
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp:
        root = Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        synthesize_dataset(root / "data", sites=args.sites, per_site=args.per_site, size=args.size, seed=3,
                           burned_in_text=0.0)
        sites = sorted(path.name for path in (root / "data").iterdir() if path.name.startswith("site-"))
        # Each simulation runs beside the idle deployment, right before the deployment's run of the
        # same config: the two runs of a pair share the machine's state of the moment.
        with Deployed(root, args.rounds, sites) as deployed:
            for repeat in range(1, args.repeats + 1):
                for secure in variants:
                    suffix = ("-secagg" if secure else "") + (f"-{repeat}" if args.repeats > 1 else "")
                    load = settled_machine_load()
                    sim = simulation(root, args.rounds, secure=secure, name="simulation" + suffix)
                    sim["machine_busy_cores"] = load
                    pairs[secure].append((sim, deployed.run(secure=secure, name="deployment" + suffix)))

    print(f"{args.sites} sites x {args.per_site} images at {args.size} px, smallcnn, DP-SGD, {args.rounds} rounds, "
          f"{args.repeats} pair(s) of runs")
    steady = "rounds 2+" if args.rounds > 1 else "round 1"
    for secure in variants:
        label = "SecAgg+" if secure else "plain"
        for index, (sim, dep) in enumerate(pairs[secure], start=1):
            tag = f"[{label}] " + (f"pair {index}: " if args.repeats > 1 else "")
            print(f"{tag}round seconds: simulation {sim['round_s']}, deployment {dep['round_s']}")
            print(f"{tag}per-round wall time ({steady}): simulation {steady_round_s(sim):.2f} s, "
                  f"deployment {steady_round_s(dep):.2f} s -> ratio {steady_round_s(dep) / steady_round_s(sim):.2f}x")
            print(f"{tag}whole run: simulation {sim['wall_s']:.1f} s, deployment {dep['wall_s']:.1f} s "
                  f"-> ratio {dep['wall_s'] / sim['wall_s']:.2f}x")
            print(f"{tag}before the simulation, the idle deployment and anything else kept "
                  f"{sim['machine_busy_cores']:.2f} cores busy")
        if args.repeats > 1:
            ratios = sorted(steady_round_s(dep) / steady_round_s(sim) for sim, dep in pairs[secure])
            print(f"[{label}] per-round wall time ({steady}), median of {args.repeats} pairs: simulation "
                  f"{statistics.median(steady_round_s(sim) for sim, _ in pairs[secure]):.2f} s, deployment "
                  f"{statistics.median(steady_round_s(dep) for _, dep in pairs[secure]):.2f} s -> ratio "
                  f"{statistics.median(ratios):.2f}x (pairs {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
        sim, dep = pairs[secure][-1]
        payload = sim["bytes_per_site_round"]
        for site_id, wire in dep["bytes_per_site_round"].items():
            up, down = dep["up_down_per_site"][site_id]
            print(f"[{label}] {site_id}: {wire / 1e6:.3f} MB on the wire per round (up {up / 1e6:.3f}, "
                  f"down {down / 1e6:.3f} MB over the run) vs {payload / 1e6:.3f} MB model payload in simulation "
                  f"-> ratio {wire / payload:.2f}x" + (" (last pair)" if args.repeats > 1 else ""))
    if True in pairs:
        print("SecAgg+ overhead (SecAgg+ / plain, same mode, same pair of this script's runs; median over pairs):")
        for mode, which in (("simulation", 0), ("deployment", 1)):
            rounds = [steady_round_s(secure[which]) / steady_round_s(plain[which])
                      for plain, secure in zip(pairs[False], pairs[True])]
            walls = [secure[which]["wall_s"] / plain[which]["wall_s"] for plain, secure in zip(pairs[False], pairs[True])]
            print(f"  {mode}: per-round wall time {statistics.median(rounds):.2f}x, "
                  f"whole run {statistics.median(walls):.2f}x")
        wire = [mean_wire(secure[1]) / mean_wire(plain[1]) for plain, secure in zip(pairs[False], pairs[True])]
        print(f"  deployment: bytes on the wire per site and round {statistics.median(wire):.2f}x")


if __name__ == "__main__":
    main()
