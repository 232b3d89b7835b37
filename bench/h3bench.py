"""``bench/run.py --h3``: rpxy's HTTP/3 against Caddy's, in front of the same nginx origin.

Both proxies get the same throwaway ``localhost`` certificate and the configs of the --h2
mode (``run.h2_transform``), plus HTTP/3: rpxy with ``[experimental.h3]``, Caddy with its
default ``protocols h1 h2 h3``. Debian's h2load has no HTTP/3, so the load comes from
``bench/h3load.py`` (qh3, Python) processes on the load core. The table reports requests/s
and how busy the proxy's core was: below ~90 % the client side, not the proxy, was the limit
(say so when quoting the ratio).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run as R  # bench/run.py: processes, origin, certificates, config templates

HERE = Path(__file__).resolve().parent
TARGETS = ("rpxy", "caddy")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run.py --h3", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h3", action="store_true", help="this mode")
    p.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets from rpxy,caddy")
    p.add_argument("--quick", action="store_true", help="1 run of 3 s")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--clients", type=int, default=2, help="h3load processes")
    p.add_argument("-c", "--connections", type=int, default=2, help="QUIC connections per h3load process")
    p.add_argument("-m", "--streams", type=int, default=10, help="requests in flight per connection")
    p.add_argument("--proxy-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--start-timeout", type=float, default=30)
    p.add_argument("--rpxy-cmd", default=str(R.DEFAULT_RPXY))
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--no-json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 3, 1
    args.targets = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in TARGETS]
    if bad:
        p.error(f"unknown targets {bad}; choose from {TARGETS}")
    # what run.proxy_command reads
    args.rpxy_extra, args.rpxy_no_log_dir, args.proto = [], True, "h2"
    return args


def _h3load(args: argparse.Namespace, port: int, duration: float, warmup: float, clients: int) -> list[str]:
    return [
        sys.executable, str(HERE / "h3load.py"), "--port", str(port), "--host", R.HOST_HEADER,
        "-c", str(args.connections), "-m", str(args.streams), "-d", str(duration), "--warmup", str(warmup),
    ]  # fmt: skip


def load(env: R.Env, port: int, duration: float, warmup: float, clients: int, tag: str) -> dict:
    """Run ``clients`` h3load processes at once; sum their counts; measure the cores meanwhile."""
    args = env.args
    outs = []
    procs = []
    before = R.core_times()
    for index in range(clients):
        out = env.logs / f"h3load-{tag}-{index}.json"
        outs.append(out)
        argv = _h3load(args, port, duration, warmup, clients)
        if env.load_cpu is not None:
            argv = ["taskset", "-c", str(env.load_cpu), *argv]
        procs.append(subprocess.Popen(argv, stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + warmup + duration + 60
    for proc in procs:
        try:
            proc.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    after = R.core_times()
    total = {"requests": 0, "errors": 0, "seconds": 0.0}
    for out in outs:
        lines = [line for line in out.read_text().splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"h3load produced no result:\n{out.read_text()[-2000:]}")
        result = json.loads(lines[-1])
        total["requests"] += result["requests"]
        total["errors"] += result["errors"]
        total["seconds"] = max(total["seconds"], result["seconds"])
    total["rps"] = total["requests"] / total["seconds"] if total["seconds"] else 0.0
    # Busy time of the proxy core includes the warmup; still the best "who saturated" signal.
    total["proxy_core_busy"] = R.core_busy(before, after, env.proxy_cpu)
    total["load_core_busy"] = R.core_busy(before, after, env.load_cpu)
    return total


def start(env: R.Env, name: str, origin_port: int) -> tuple[subprocess.Popen, int]:
    port = R.free_port()
    argv, env_vars = R.proxy_command(env, name, port, origin_port, "h3", proto="h2")
    if name == "rpxy":
        conf = Path(argv[argv.index("--config") + 1])
        conf.write_text(conf.read_text() + "\n[experimental.h3]\n")
    p = env.procs.start(name, argv, env.log_path(f"{name}-h3"), cpu=env.proxy_cpu, env=env_vars)
    deadline = time.monotonic() + env.args.start_timeout
    while True:
        if p.poll() is not None:
            raise R.StartError(f"{name} exited with code {p.returncode}:\n{R.tail(p.bench_log)}")  # type: ignore[attr-defined]
        try:
            check = load(env, port, 0.5, 0.0, 1, f"{name}-check")
            if check["requests"] > 0:
                return p, port
            last = f"{check}"
        except (RuntimeError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            env.procs.stop(p)
            raise R.StartError(f"{name} not answering HTTP/3 on UDP {port}: {last}\n{R.tail(p.bench_log)}")  # type: ignore[attr-defined]
        time.sleep(0.3)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    R.ensure_packages(False, {k: v for k, v in R.H2_PACKAGES.items() if k in ("nginx", "caddy", "openssl", "taskset")})
    R.setup_cpus(args)
    tmp = Path(tempfile.mkdtemp(prefix="rpxy-bench-h3-"))
    tmp.chmod(0o755)
    procs = R.Procs()
    env = R.Env(args, tmp, procs)
    results = []
    try:
        _origin, origin_port = R.start_origin_nginx(env)
        env.tls = R.make_certs(tmp)
        for name in args.targets:
            R.log(f"=== {name} (HTTP/3)")
            try:
                p, port = start(env, name, origin_port)
            except R.StartError as exc:
                R.log(f"{name} FAILED: {exc}")
                results.append({"target": name, "ok": False, "error": str(exc)})
                continue
            runs = [load(env, port, args.duration, args.warmup, args.clients, f"{name}-{i}") for i in range(args.runs)]
            env.procs.stop(p)
            rps = statistics.median(r["rps"] for r in runs)
            busy = statistics.median(r["proxy_core_busy"] or 0 for r in runs)
            errors = sum(r["errors"] for r in runs)
            results.append({"target": name, "ok": True, "rps": rps, "proxy_core_busy": busy, "errors": errors, "runs": runs})
            R.log(f"{name}: {rps:.0f} req/s, proxy core {busy:.0f}% busy, {errors} errors")
    finally:
        procs.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    by = {r["target"]: r for r in results if r.get("ok")}
    print(
        f"\nHTTP/3: {args.clients} h3load process(es) x {args.connections} connections x {args.streams} streams, "
        f"{args.runs} run(s) of {args.duration:g}s, proxy on core {args.proxy_cpu}, origin+load on core {args.load_cpu}\n"
    )
    print("| target | req/s | proxy core busy | errors |\n|---|---|---|---|")
    for r in results:
        if r.get("ok"):
            print(f"| {r['target']} | {r['rps']:.0f} | {r['proxy_core_busy']:.0f}% | {r['errors']} |")
        else:
            print(f"| {r['target']} | failed | | |")
    if "rpxy" in by and "caddy" in by and by["caddy"]["rps"]:
        ratio = by["rpxy"]["rps"] / by["caddy"]["rps"]
        print(f"\nrpxy / Caddy = {ratio:.2f}x")
        for name, r in by.items():
            if (r["proxy_core_busy"] or 0) < 90:
                print(f"- {name}: its core was {r['proxy_core_busy']:.0f}% busy: the load side was the limit, not {name}")
    if not args.no_json:
        R.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        path = R.RESULTS_DIR / f"{stamp}-h3.json"
        path.write_text(json.dumps({"mode": "throughput-h3", "params": {k: v for k, v in vars(args).items()}, "results": results}, indent=2) + "\n")
        print(f"\nJSON: {path}")
    return 0 if all(r.get("ok") for r in results) else 1
