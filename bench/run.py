#!/usr/bin/env python3
"""Benchmark harness: rpxy (this project) vs nginx, HAProxy and Caddy.

Default mode (throughput): every proxy sits in front of the same fast static
origin (an nginx serving a 1 KiB ``index.html``) and is driven by ``wrk`` with
HTTP/1.1 keep-alive. Each proxy is pinned to one core (``taskset -c 0``), the
origin, wrk and this script to the other one (``taskset -c 1``). Per target it
reports the median req/s over the runs, p50/p99 latency, peak RSS of the proxy's
process tree, its CPU use, and the ratio to nginx's req/s.

``--h2`` / ``--h2c`` modes: the same targets and origin, loaded with ``h2load`` over HTTP/2
(``--h2``: TLS with ALPN h2 and a throwaway CA + ``localhost`` certificate made with the
``openssl`` CLI; ``--h2c``: cleartext HTTP/2 with prior knowledge). The proxies still talk
HTTP/1.1 to the origin.

``--cache`` mode: cached responses. The origin's page is sent with ``Cache-Control:
max-age=3600``, rpxy runs with ``[experimental.cache]`` and nginx with ``proxy_cache``; after a
check that the second request is a hit, wrk measures hits served per second (HTTP/1.1).

``--big-download`` mode: a 1 GiB file is downloaded once through each target
(default: rpxy only) with curl, then a 1 GiB body is uploaded through it to a
small Python sink origin; the peak RSS of the proxy is compared to a limit
(default 100 MiB).

Stdlib only; run with any python3 >= 3.9, e.g. ``python3 bench/run.py --quick``.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import re
import resource
import shutil
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONF_DIR = HERE / "conf"
RESULTS_DIR = HERE / "results"
DEFAULT_RPXY = REPO / ".venv" / "bin" / "rpxy"

# binary -> Debian package
PACKAGES = {
    "wrk": "wrk",
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "curl": "curl",
    "taskset": "util-linux",
}
# extra binaries of the --h2/--h2c modes (wrk is not needed there)
H2_PACKAGES = {
    "h2load": "nghttp2-client",
    "openssl": "openssl",
    "curl": "curl",
    "taskset": "util-linux",
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "caddy": "caddy",
}
PROXY_TARGETS = ["rpxy", "nginx", "haproxy", "caddy"]
# "direct" = wrk straight at the origin: the ceiling of the load core, not a proxy.
ALL_TARGETS = PROXY_TARGETS + ["direct"]
HOST_HEADER = "localhost"
BODY_SIZE = 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


class StartError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup


def ensure_packages(skip: bool, packages: dict[str, str] = PACKAGES) -> None:
    missing = sorted({pkg for binary, pkg in packages.items() if shutil.which(binary) is None})
    if not missing:
        return
    if skip:
        raise SystemExit(f"missing packages {missing} and --no-install given")
    if shutil.which("apt-get") is None:
        raise SystemExit(f"missing packages {missing} and no apt-get: install them by hand")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise SystemExit(f"missing packages {missing}: run as root or install them by hand")
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = prefix + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    log(f"installing {' '.join(missing)} ...")
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        log("apt-get install failed; running apt-get update and retrying")
        subprocess.run(prefix + ["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)
    still = sorted({pkg for binary, pkg in packages.items() if shutil.which(binary) is None})
    if still:
        raise SystemExit(f"packages still missing after apt-get: {still}")


_used_ports: set[int] = set()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 chosen by the kernel (never reused within a run)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port")


def render(template: str, dest: Path, transform=None, **values: object) -> Path:
    text = (CONF_DIR / template).read_text()
    if transform is not None:
        text = transform(text)
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    leftover = re.findall(r"\{\{(\w+)\}\}", text)
    if leftover:
        raise RuntimeError(f"{template}: unfilled placeholders {leftover}")
    dest.write_text(text)
    return dest


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def cmd_output(argv: list[str], timeout: float = 10) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else f"exit {r.returncode}"


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process we start runs in its own session/process group; stop() kills the group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        with open(log_path, "ab") as out:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        p.bench_name = name  # type: ignore[attr-defined]
        p.bench_log = log_path  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of the group (workers, children), and the leader if still alive
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            log(f"warning: {getattr(p, 'bench_name', p.pid)} (pid {p.pid}) did not die")
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p, grace=3.0)


def _read_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("latin-1")
    except OSError:
        return None
    # fields after "pid (comm) ": state ppid pgrp session ... utime(11) stime(12)
    return data[data.rindex(")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    """All live processes of session ``sid`` (our Popen leaders start a new session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _read_stat(int(entry))
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = _read_stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def core_times() -> dict[int, tuple[int, int, int]]:
    """cpu index -> (busy, total, task) jiffies from /proc/stat.

    busy includes irq/softirq time (loopback networking is largely softirq work, which the
    kernel does not charge to any process); task is user + nice + system time of processes.
    """
    result = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                total = sum(v[:8])
                result[int(m.group(1))] = (total - idle, total, v[0] + v[1] + v[2])
    return result


def core_busy(before: dict, after: dict, cpu: int | None, field: int = 0) -> float | None:
    """Percentage of the interval core ``cpu`` spent busy (field 0) or running processes (field 2)."""
    if cpu is None or cpu not in before or cpu not in after:
        return None
    part = after[cpu][field] - before[cpu][field]
    total = after[cpu][1] - before[cpu][1]
    return 100.0 * part / total if total > 0 else None


class MemSampler(threading.Thread):
    """Samples the summed RSS (and PSS) of a process session until stopped; keeps the peak."""

    def __init__(self, sid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.sid = sid
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.samples = 0
        self.max_procs = 0
        self._halt = threading.Event()

    def sample_once(self, pids: list[int]) -> int:
        rss = sum(rss_bytes(p) for p in pids)
        pss = sum(pss_bytes(p) for p in pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.samples += 1
        return rss

    def run(self) -> None:
        pids = session_pids(self.sid)
        rescan = time.monotonic() + 0.5
        while True:
            now = time.monotonic()
            if now >= rescan:
                pids = session_pids(self.sid)
                rescan = now + 0.5
            self.max_procs = max(self.max_procs, len(pids))
            self.sample_once(pids)
            if self._halt.wait(self.interval):
                break
        self.sample_once(session_pids(self.sid))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def current_rss(sid: int) -> int:
    return sum(rss_bytes(p) for p in session_pids(sid))


# --------------------------------------------------------------------------- HTTP helpers


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": HOST_HEADER})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def response_warnings(port: int) -> list[str]:
    """Problems in one proxied response that make strict clients (wrk's parser) reject it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": HOST_HEADER})
        resp = conn.getresponse()
        body = resp.read()
        msg = resp.msg
    except (OSError, http.client.HTTPException) as exc:
        return [f"GET / failed: {exc}"]
    finally:
        conn.close()
    warnings = []
    for name in ("content-length", "transfer-encoding", "content-type"):
        values = msg.get_all(name) or []
        if len(values) > 1:
            warnings.append(f"response has {len(values)} {name} headers: {values}")
    if msg.get("content-length") and msg.get("transfer-encoding"):
        warnings.append("response has both content-length and transfer-encoding")
    if len(body) != BODY_SIZE:
        warnings.append(f"body is {len(body)} bytes, expected {BODY_SIZE}")
    return warnings


def wait_ready(port: int, proc: subprocess.Popen | None, name: str, body_len: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StartError(f"{name} exited with code {proc.returncode}:\n{tail(proc.bench_log)}")  # type: ignore[attr-defined]
        try:
            status, body = http_get(port)
            if status == 200 and (body_len is None or len(body) == body_len):
                return
            last = f"status {status}, {len(body)} body bytes"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{exc.__class__.__name__}: {exc}"
        time.sleep(0.1)
    log_tail = tail(proc.bench_log) if proc is not None else ""  # type: ignore[attr-defined]
    raise StartError(f"{name} not ready on port {port} after {timeout:.0f}s ({last})\n{log_tail}")


# --------------------------------------------------------------------------- targets


class Env:
    """Everything shared by a run: the temp dir, CPUs, process registry, args."""

    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Procs) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.proxy_cpu: int | None = args.proxy_cpu
        self.load_cpu: int | None = args.load_cpu
        self.logs = tmp / "logs"
        self.logs.mkdir()
        # cert/key/pem/ca paths (template values) in --h2 mode
        self.tls: dict[str, str] | None = None

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def start_origin_nginx(env: Env) -> tuple[subprocess.Popen, int]:
    docroot = env.tmp / "docroot"
    docroot.mkdir(exist_ok=True)
    body = (b"<!doctype html><title>bench</title>\n" + b"x" * BODY_SIZE)[: BODY_SIZE - 1] + b"\n"
    assert len(body) == BODY_SIZE
    (docroot / "index.html").write_bytes(body)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (env.tmp / "origin-tmp" / d).mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = render("origin-nginx.conf", env.tmp / "origin-nginx.conf", prefix=env.tmp, docroot=docroot, origin_port=port)
    argv = ["nginx", "-p", f"{env.tmp}/", "-c", str(conf), "-e", str(env.tmp / "origin-nginx.error.log")]
    p = env.procs.start("origin", argv, env.log_path("origin-nginx"), cpu=env.load_cpu)
    wait_ready(port, p, "origin nginx", BODY_SIZE, 15)
    return p, port


def start_sink(env: Env) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [sys.executable, str(HERE / "upload_sink.py"), "--port", str(port)]
    if env.args.throttle:
        argv += ["--rate", str(env.args.throttle)]
    p = env.procs.start("sink", argv, env.log_path("upload-sink"), cpu=env.load_cpu)
    wait_ready(port, p, "upload sink", None, 15)
    return p, port


def proxy_command(
    env: Env, name: str, port: int, upstream_port: int, tag: str, rpxy_extra: str = "", proto: str = "h1"
) -> tuple[list[str], dict[str, str] | None]:
    """argv + environment of a proxy listening on 127.0.0.1:``port`` with protocol ``proto``.

    ``proto`` is ``h1`` (the configs in bench/conf as they are), ``h2`` (TLS, ALPN h2 + http/1.1)
    or ``h2c`` (cleartext HTTP/2, prior knowledge); the HTTP/2 configs are derived from the same
    templates by ``h2_transform`` so everything else (upstream keep-alive, timeouts) stays identical.
    """
    tmp = env.tmp
    tls = env.tls or {}
    transform = h2_transform(name, proto)
    if name == "nginx":
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / "proxy-nginx-tmp" / d).mkdir(parents=True, exist_ok=True)
        conf = render(
            "nginx.conf", tmp / f"nginx-{tag}.conf", transform, prefix=tmp, port=port, upstream_port=upstream_port, **tls
        )
        return ["nginx", "-p", f"{tmp}/", "-c", str(conf), "-e", str(tmp / "proxy-nginx.error.log")], None
    if name == "haproxy":
        conf = render("haproxy.cfg", tmp / f"haproxy-{tag}.cfg", transform, port=port, upstream_port=upstream_port, **tls)
        return ["haproxy", "-f", str(conf), "-db"], None
    if name == "caddy":
        conf = render("Caddyfile", tmp / f"Caddyfile-{tag}", transform, port=port, upstream_port=upstream_port, **tls)
        home = tmp / "caddy-home"
        home.mkdir(exist_ok=True)
        env_vars = dict(
            os.environ,
            GOMAXPROCS="1",
            HOME=str(home),
            XDG_DATA_HOME=str(home / "data"),
            XDG_CONFIG_HOME=str(home / "config"),
        )
        return ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"], env_vars
    if name == "rpxy":
        extra = "\n".join(x for x in (rpxy_extra, *env.args.rpxy_extra) if x)
        if env.args.connections > 400:
            extra += f"\nmax_clients = {env.args.connections * 2}"
        clear_port = port
        if proto == "h2":
            # rpxy's TLS port (ALPN h2, http/1.1) is the one measured; its cleartext listen_port is another free port
            clear_port = free_port()
            extra += f"\nlisten_port_tls = {port}"
        conf = render(
            "rpxy.toml",
            tmp / f"rpxy-{tag}.toml",
            transform,
            port=clear_port,
            upstream_port=upstream_port,
            rpxy_extra=extra,
            **tls,
        )
        argv = [*shlex.split(env.args.rpxy_cmd), "--config", str(conf)]
        if getattr(env.args, "rpxy_workers", 1) > 1:
            argv += ["--workers", str(env.args.rpxy_workers)]  # a supervisor + N workers (SO_REUSEPORT)
        if not env.args.rpxy_no_log_dir:
            log_dir = tmp / f"rpxy-logs-{tag}"
            log_dir.mkdir(exist_ok=True)
            argv += ["--log-dir", str(log_dir)]
        return argv, None
    raise ValueError(name)


def start_proxy(
    env: Env, name: str, upstream_port: int, tag: str, body_len: int | None, rpxy_extra: str = ""
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv, env_vars = proxy_command(env, name, port, upstream_port, tag, rpxy_extra)
    p = env.procs.start(name, argv, env.log_path(f"{name}-{tag}"), cpu=env.proxy_cpu, env=env_vars)
    try:
        wait_ready(port, p, name, body_len, env.args.start_timeout)
        if name == "rpxy" and getattr(env, "pin_workers", None):
            pin_workers(p.pid, env.pin_workers, env.args.rpxy_workers, env.args.start_timeout)  # --scaling
    except BaseException:
        env.procs.stop(p)
        raise
    return p, port


def pin_workers(supervisor: int, cpus: list[int], count: int, timeout: float) -> None:
    """Pin rpxy's worker processes (children of ``supervisor``) one per core, in turn over ``cpus``
    (``--scaling``: a deterministic placement, where the kernel's own varies from run to run)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = sorted(
            pid for pid in session_pids(supervisor) if pid != supervisor and (_read_stat(pid) or ["", ""])[1] == str(supervisor)
        )
        if len(workers) >= count:
            break
        if time.monotonic() > deadline:
            raise StartError(f"rpxy: {len(workers)} of {count} workers running")
        time.sleep(0.05)
    for i, pid in enumerate(workers):
        os.sched_setaffinity(pid, {cpus[i % len(cpus)]})
    log(f"rpxy workers pinned: {', '.join(f'pid {pid} -> core {cpus[i % len(cpus)]}' for i, pid in enumerate(workers))}")


# --------------------------------------------------------------------------- HTTP/2 (--h2, --h2c)


def make_certs(tmp: Path) -> dict[str, str]:
    """A throwaway CA and a P-256 server certificate for ``localhost`` (+ 127.0.0.1), via the openssl CLI.

    Returns the template values: cert, key (PEM files) and pem (cert + key in one file, for HAProxy).
    """
    d = tmp / "tls"
    d.mkdir()
    ca_key, ca_crt = d / "ca.key", d / "ca.pem"
    key, csr, crt, pem, ext = d / "localhost.key", d / "localhost.csr", d / "localhost.crt", d / "haproxy.pem", d / "ext.cnf"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ext.write_text(
        "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n"
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
    )
    steps = [
        ["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2", "-subj", "/CN=rpxy bench throwaway CA"],
        ["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-set_serial", "1",
         "-days", "2", "-extfile", str(ext), "-out", str(crt)],
    ]  # fmt: skip
    for argv in steps:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{r.stdout}{r.stderr}")
    pem.write_text(crt.read_text() + key.read_text())
    for f in (key, pem, ca_key):
        f.chmod(0o600)
    return {"cert": str(crt), "key": str(key), "pem": str(pem), "ca": str(ca_crt)}


def _sub1(text: str, old: str, new: str, what: str) -> str:
    if old not in text:
        raise RuntimeError(f"{what}: cannot derive the HTTP/2 config, {old!r} is not in the template any more")
    return text.replace(old, new, 1)


def h2_transform(name: str, proto: str):
    """A function turning the HTTP/1.1 template of ``name`` into its ``proto`` (h2/h2c) variant, or None."""
    if proto == "h1":
        return None
    if proto not in ("h2", "h2c"):
        raise ValueError(proto)
    tls = proto == "h2"
    if name == "nginx":
        old = "listen 127.0.0.1:{{port}} backlog=4096;"
        if tls:
            new = (
                "listen 127.0.0.1:{{port}} ssl http2 backlog=4096;\n"
                "        ssl_certificate {{cert}};\n        ssl_certificate_key {{key}};\n"
                # nginx 1.22's default ssl_protocols lacks TLSv1.3 (the others all negotiate 1.3)
                "        ssl_protocols TLSv1.2 TLSv1.3;"
            )
        else:  # "listen ... http2" without ssl: h2c with prior knowledge only
            new = "listen 127.0.0.1:{{port}} http2 backlog=4096;"
        return lambda t: _sub1(t, old, new, "nginx.conf")
    if name == "haproxy":
        old = "bind 127.0.0.1:{{port}}\n"
        new = "bind 127.0.0.1:{{port}} ssl crt {{pem}} alpn h2,http/1.1\n" if tls else "bind 127.0.0.1:{{port}} proto h2\n"
        return lambda t: _sub1(t, old, new, "haproxy.cfg")
    if name == "caddy":
        if tls:
            # default_sni: in case a client sends no SNI; the site address gives Caddy's own h1/h2 TLS server
            def caddy(t: str) -> str:
                t = _sub1(t, "auto_https off\n", "auto_https off\n\tdefault_sni localhost\n", "Caddyfile")
                return _sub1(t, "http://:{{port}} {\n", "https://localhost:{{port}} {\n\ttls {{cert}} {{key}}\n", "Caddyfile")

            return caddy
        return lambda t: _sub1(
            t, "auto_https off\n", "auto_https off\n\tservers {\n\t\tprotocols h1 h2c\n\t}\n", "Caddyfile"
        )
    if name == "rpxy":
        if not tls:  # rpxy's cleartext port takes h2c prior knowledge as it is
            return None
        line = 'tls = { tls_cert_path = "{{cert}}", tls_cert_key_path = "{{key}}", https_redirection = false }\n'
        return lambda t: _sub1(t, 'server_name = "localhost"\n', 'server_name = "localhost"\n' + line, "rpxy.toml")
    raise ValueError(name)


def h2_url(proto: str, port: int) -> str:
    # "localhost" gives SNI + :authority localhost (rpxy's server_name, Caddy's site); clients are told to
    # connect to 127.0.0.1 (curl --resolve, h2load --connect-to) whatever localhost resolves to
    return f"{'https' if proto == 'h2' else 'http'}://{HOST_HEADER}:{port}/"


def h2_check(env: Env, port: int) -> tuple[str, str]:
    """One GET through curl over HTTP/2: ("ok"|"wait"|"bad", detail)."""
    proto = env.args.proto
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", "3", "-w", "%{http_code} %{http_version} %{size_download}"]
    argv += ["-k", "--http2"] if proto == "h2" else ["--http2-prior-knowledge"]
    argv += ["--resolve", f"{HOST_HEADER}:{port}:127.0.0.1", h2_url(proto, port)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return "wait", "curl timed out"
    parts = r.stdout.split()
    if r.returncode != 0 or len(parts) != 3:
        return "wait", f"curl exit {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}"
    code, version, size = parts
    if code != "200":
        return "wait", f"status {code}"
    if version != "2":
        return "bad", f"answered over HTTP/{version}, not HTTP/2"
    if int(float(size)) != BODY_SIZE:
        return "bad", f"body is {size} bytes, expected {BODY_SIZE}"
    return "ok", ""


def start_proxy_h2(env: Env, name: str, upstream_port: int) -> tuple[subprocess.Popen, int]:
    proto = env.args.proto
    port = free_port()
    argv, env_vars = proxy_command(env, name, port, upstream_port, proto, proto=proto)
    p = env.procs.start(name, argv, env.log_path(f"{name}-{proto}"), cpu=env.proxy_cpu, env=env_vars)
    try:
        deadline = time.monotonic() + env.args.start_timeout
        last = "no answer"
        while True:
            if p.poll() is not None:
                raise StartError(f"{name} exited with code {p.returncode}:\n{tail(p.bench_log)}")  # type: ignore[attr-defined]
            state, last = h2_check(env, port)
            if state == "ok":
                break
            if state == "bad":
                raise StartError(f"{name} on port {port}: {last}")
            if time.monotonic() > deadline:
                raise StartError(
                    f"{name} not ready over {proto} on port {port} after {env.args.start_timeout:.0f}s ({last})\n"
                    f"{tail(p.bench_log)}"  # type: ignore[attr-defined]
                )
            time.sleep(0.2)
    except BaseException:
        env.procs.stop(p)
        raise
    return p, port


def parse_h2load(text: str) -> dict:
    m = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", text)
    if not m:
        raise ValueError("no 'finished in ... req/s' in h2load output")
    out: dict = {"rps": float(m.group(3)), "latency_ms": {}}
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text
    )
    if not m:
        raise ValueError("no 'requests:' line in h2load output")
    total, _started, done, ok, failed, errored, timeout = map(int, m.groups())
    out.update(total=total, done=done, requests=ok, failed=failed, errored=errored, timeout=timeout)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    codes = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()))) if m else {}
    out["status_codes"] = codes
    out["non_2xx_3xx"] = codes.get("4xx", 0) + codes.get("5xx", 0)
    # h2load gives no percentiles: min / max / mean / sd of the per-request time
    m = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", text)
    if m:
        g = m.groups()
        for i, key in enumerate(("min", "max", "mean", "sd")):
            out["latency_ms"][key] = round(float(g[2 * i]) * _UNIT_MS[g[2 * i + 1]], 4)
    m = re.search(r"Application protocol: (\S+)", text)
    out["protocol"] = m.group(1) if m else None
    m = re.search(r"Cipher: (\S+)", text)
    out["cipher"] = m.group(1) if m else None
    m = re.search(r"TLS Protocol: (\S+)", text)
    out["tls_protocol"] = m.group(1) if m else None
    out["errors"] = failed + errored + timeout + out["non_2xx_3xx"] + (total - done)
    return out


def run_h2load(env: Env, port: int, requests: int, tag: str) -> dict:
    a = env.args
    argv = [
        "h2load",
        f"-n{requests}",
        f"-c{a.connections}",
        f"-m{a.streams}",
        f"-t{a.threads}",
        "-N",
        "10s",  # a connection without activity for 10 s is given up (counted as timeout), no hang
        "--connect-to",
        f"127.0.0.1:{port}",
        # one TLS 1.3 suite for every target (HAProxy would otherwise pick AES-256, the others AES-128)
        "--tls13-ciphers=TLS_AES_128_GCM_SHA256",
        h2_url(a.proto, port),
    ]
    out_path = env.log_path(f"h2load-{tag}")
    p = env.procs.start("h2load", argv, out_path, cpu=env.load_cpu)
    try:
        p.wait(requests / 500 + 60)
    except subprocess.TimeoutExpired:
        raise RuntimeError("h2load hung") from None
    finally:
        env.procs.stop(p)
    text = out_path.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"h2load failed ({p.returncode}):\n{text[-3000:]}")
    r = parse_h2load(text)
    if r["protocol"] != "h2" and r["protocol"] != "h2c":
        raise RuntimeError(f"h2load negotiated {r['protocol']!r}, not h2:\n{text[-3000:]}")
    return r


def rpxy_available(args: argparse.Namespace) -> str | None:
    """None if the rpxy command looks runnable, else the reason."""
    exe = shlex.split(args.rpxy_cmd)[0]
    if shutil.which(exe) is None and not os.access(exe, os.X_OK):
        return f"{exe} not found"
    return None


# --------------------------------------------------------------------------- response cache (--cache)

CACHE_TARGETS = ["rpxy", "nginx"]
CACHE_ORIGIN_MAX_AGE = 3600


def start_origin_nginx_cache(env: Env) -> tuple[subprocess.Popen, int]:
    """The usual origin, but its page says ``Cache-Control: max-age=3600`` (both caches store it)."""
    docroot = env.tmp / "docroot"
    docroot.mkdir(exist_ok=True)
    body = (b"<!doctype html><title>bench</title>\n" + b"x" * BODY_SIZE)[: BODY_SIZE - 1] + b"\n"
    (docroot / "index.html").write_bytes(body)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (env.tmp / "origin-tmp" / d).mkdir(parents=True, exist_ok=True)
    port = free_port()
    old = "index index.html;\n"
    new = f"index index.html;\n        expires {CACHE_ORIGIN_MAX_AGE}s;\n"
    conf = render(
        "origin-nginx.conf",
        env.tmp / "origin-nginx-cache.conf",
        lambda t: _sub1(t, old, new, "origin-nginx.conf"),
        prefix=env.tmp,
        docroot=docroot,
        origin_port=port,
    )
    argv = ["nginx", "-p", f"{env.tmp}/", "-c", str(conf), "-e", str(env.tmp / "origin-nginx.error.log")]
    p = env.procs.start("origin", argv, env.log_path("origin-nginx"), cpu=env.load_cpu)
    wait_ready(port, p, "origin nginx", BODY_SIZE, 15)
    return p, port


def cache_config_patch(env: Env, name: str, conf: Path) -> None:
    """Turn a rendered proxy config into its caching variant (rpxy: [experimental.cache]; nginx: proxy_cache)."""
    text = conf.read_text()
    if name == "rpxy":
        cache_dir = env.tmp / "rpxy-cache"
        text += f'\n[experimental.cache]\ncache_dir = "{cache_dir}"\n'
    elif name == "nginx":
        cache_dir = env.tmp / "proxy-nginx-cache"
        text = _sub1(
            text,
            "    upstream origin {\n",
            f"    proxy_cache_path {cache_dir} levels=1:2 keys_zone=bench:10m max_size=100m inactive=1h use_temp_path=off;\n\n"
            "    upstream origin {\n",
            "nginx.conf",
        )
        text = _sub1(
            text,
            "            proxy_pass http://origin;\n",
            "            proxy_pass http://origin;\n            proxy_cache bench;\n"
            "            add_header X-Cache-Status $upstream_cache_status;\n",
            "nginx.conf",
        )
    else:
        raise ValueError(f"{name} has no cache configuration here (targets: {CACHE_TARGETS})")
    conf.write_text(text)


def cache_hit_check(name: str, port: int) -> str:
    """Two GETs; the second must be a cache hit (Cache-Status for rpxy, X-Cache-Status for nginx)."""
    header = ""
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": HOST_HEADER})
            resp = conn.getresponse()
            body = resp.read()
            header = resp.getheader("cache-status" if name == "rpxy" else "x-cache-status") or ""
        finally:
            conn.close()
        if resp.status != 200 or len(body) != BODY_SIZE:
            raise StartError(f"{name}: status {resp.status}, {len(body)} body bytes")
    hit = "hit" in header if name == "rpxy" else header == "HIT"
    if not hit:
        raise StartError(f"{name}: the second request was not a cache hit ({header!r})")
    return header


def start_proxy_cache(env: Env, name: str, upstream_port: int) -> tuple[subprocess.Popen, int]:
    """``name`` with its response cache on, checked to answer the page from the cache."""
    port = free_port()
    argv, env_vars = proxy_command(env, name, port, upstream_port, "cache")
    conf = env.tmp / ("rpxy-cache.toml" if name == "rpxy" else "nginx-cache.conf")
    cache_config_patch(env, name, conf)
    p = env.procs.start(name, argv, env.log_path(f"{name}-cache"), cpu=env.proxy_cpu, env=env_vars)
    try:
        wait_ready(port, p, name, BODY_SIZE, env.args.start_timeout)
        log(f"{name}: cache hit confirmed ({cache_hit_check(name, port)})")
    except BaseException:
        env.procs.stop(p)
        raise
    return p, port


# --------------------------------------------------------------------------- wrk

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}
_UNIT_B = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_wrk(text: str) -> dict:
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise ValueError("no Requests/sec in wrk output")
    out: dict = {"rps": float(m.group(1)), "latency_ms": {}}
    for pm in re.finditer(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE):
        out["latency_ms"][pm.group(1)] = round(float(pm.group(2)) * _UNIT_MS[pm.group(3)], 4)
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", text)
    if m:
        out["requests"] = int(m.group(1))
        out["bytes_read"] = int(float(m.group(4)) * _UNIT_B.get(m.group(5), 1))
        out["bytes_per_request"] = round(out["bytes_read"] / out["requests"], 1) if out["requests"] else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
        if m
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx_3xx"] = int(m.group(1)) if m else 0
    out["errors"] = sum(out["socket_errors"].values()) + out["non_2xx_3xx"]
    return out


def run_wrk(env: Env, port: int, duration: float, tag: str) -> dict:
    a = env.args
    argv = [
        "wrk",
        f"-t{a.threads}",
        f"-c{a.connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "5s",
        "-H",
        f"Host: {HOST_HEADER}",
        f"http://127.0.0.1:{port}/",
    ]
    out_path = env.log_path(f"wrk-{tag}")
    p = env.procs.start("wrk", argv, out_path, cpu=env.load_cpu)
    try:
        p.wait(duration + 60)
    except subprocess.TimeoutExpired:
        raise RuntimeError("wrk hung") from None
    finally:
        env.procs.stop(p)
    text = out_path.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}):\n{text}")
    return parse_wrk(text)


def bench_target(env: Env, name: str, origin_port: int) -> dict:
    a = env.args
    h2 = a.proto != "h1"
    res: dict = {"target": name}
    proc = None
    sampler = None
    if name == "direct":
        port = origin_port
        sid = None
    elif h2:
        proc, port = start_proxy_h2(env, name, origin_port)
        sid = proc.pid
    elif a.cache:
        proc, port = start_proxy_cache(env, name, origin_port)
        sid = proc.pid
    else:
        proc, port = start_proxy(env, name, origin_port, "rps", BODY_SIZE)
        sid = proc.pid
    try:
        res["warnings"] = [] if h2 else response_warnings(port)
        for w in res["warnings"]:
            log(f"{name}: WARNING {w}")
        if sid is not None:
            res["idle_rss_bytes"] = current_rss(sid)
        if sid is not None:
            sampler = MemSampler(sid, a.sample_interval)
            sampler.start()
        if h2 and a.warmup_requests > 0:
            log(f"{name}: warmup {a.warmup_requests} requests")
            run_h2load(env, port, a.warmup_requests, f"{name}-warmup")
        elif not h2 and a.warmup > 0:
            log(f"{name}: warmup {a.warmup}s")
            run_wrk(env, port, a.warmup, f"{name}-warmup")
        runs = []
        for i in range(a.runs):
            pids = session_pids(sid) if sid is not None else []
            cpu0 = cpu_seconds(pids)
            cores0 = core_times()
            t0 = time.monotonic()
            if h2:
                r = run_h2load(env, port, a.requests, f"{name}-run{i + 1}")
            else:
                r = run_wrk(env, port, a.duration, f"{name}-run{i + 1}")
            wall = time.monotonic() - t0
            cores1 = core_times()
            if sid is not None:
                r["proxy_cpu_pct"] = round(100.0 * (cpu_seconds(session_pids(sid)) - cpu0) / wall, 1)
            r["proxy_core_busy_pct"] = _round(core_busy(cores0, cores1, env.proxy_cpu))
            r["proxy_core_task_pct"] = _round(core_busy(cores0, cores1, env.proxy_cpu, 2))
            r["load_core_busy_pct"] = _round(core_busy(cores0, cores1, env.load_cpu))
            runs.append(r)
            if h2:
                lat = f"mean {r['latency_ms'].get('mean')} ms, max {r['latency_ms'].get('max')} ms, {r.get('tls_protocol') or 'h2c'} {r.get('cipher') or ''}"
            else:
                lat = f"p99 {r['latency_ms'].get('99', float('nan'))} ms"
            log(
                f"{name} run {i + 1}/{a.runs}: {r['rps']:.0f} req/s, {lat}, "
                f"errors {r['errors']}, proxy cpu {_fmt(r.get('proxy_cpu_pct'))}%, "
                f"core{env.proxy_cpu} {r['proxy_core_busy_pct']}%, core{env.load_cpu} {r['load_core_busy_pct']}%"
            )
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} died during the run:\n{tail(proc.bench_log)}")  # type: ignore[attr-defined]
        if sampler is not None:
            sampler.stop()
            res["peak_rss_bytes"] = sampler.peak_rss
            res["peak_pss_bytes"] = sampler.peak_pss
            res["max_processes"] = sampler.max_procs
            res["rss_samples"] = sampler.samples
        res["runs"] = runs
        res["median_rps"] = statistics.median(r["rps"] for r in runs)
        for q in ("50", "99"):
            vals = [r["latency_ms"][q] for r in runs if q in r["latency_ms"]]
            res[f"median_p{q}_ms"] = statistics.median(vals) if vals else None
        for q in ("mean", "max"):  # h2load: per-request time, no percentiles
            vals = [r["latency_ms"][q] for r in runs if q in r["latency_ms"]]
            res[f"median_{q}_ms"] = statistics.median(vals) if vals else None
        if h2:
            res["protocol"] = sorted({str(r.get("protocol")) for r in runs})
            res["cipher"] = sorted({str(r.get("cipher")) for r in runs if r.get("cipher")})
        res["errors"] = sum(r["errors"] for r in runs)
        for key in ("proxy_cpu_pct", "proxy_core_busy_pct", "proxy_core_task_pct", "load_core_busy_pct"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            res[f"median_{key}"] = _round(statistics.median(vals)) if vals else None
        res["ok"] = True
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if proc is not None:
            env.procs.stop(proc)
    return res


def scaling_cpus(env: Env) -> str:
    """The cores of the N-worker run: ``--scaling-cpus``, else the proxy core + the load core."""
    if env.args.scaling_cpus:
        return env.args.scaling_cpus
    cpus = [c for c in (env.proxy_cpu, env.load_cpu) if c is not None]
    return ",".join(str(c) for c in dict.fromkeys(cpus)) or "all"


def scaling_targets(env: Env, origin_port: int) -> list[dict]:
    """``--scaling``: rpxy with 1 worker, then N (default 2), with the placements:

    1. 1 worker on the proxy core (the usual baseline);
    2. N workers on that same core: the cost of having several workers (ideally 1.00x);
    3. N workers allowed on ``--scaling-cpus`` (default: the proxy core and the load core);
    4. the same with worker i pinned to the i-th core of the list (a fixed placement).

    ``taskset`` gives the supervisor a CPU set and every worker inherits all of it (the
    kernel places them within it). On a 2-core machine placement 3 shares the load core with
    wrk and the origin: see bench/README.md ("Workers") for what that can and cannot show.
    """
    a = env.args
    many = a.rpxy_workers if a.rpxy_workers > 1 else 2
    saved_cpu, saved_workers = env.proxy_cpu, a.rpxy_workers
    spread = scaling_cpus(env)
    plan = [(1, saved_cpu), (many, saved_cpu), (many, None if spread == "all" else spread)]
    if spread != "all" and re.fullmatch(r"\d+(,\d+)*", spread):
        plan.append((many, "pinned:" + spread))  # one worker per core of the list
    results = []
    try:
        for step, (count, cpus) in enumerate(plan, 1):
            a.rpxy_workers = count
            env.pin_workers = None
            if isinstance(cpus, str) and cpus.startswith("pinned:"):
                env.pin_workers = [int(c) for c in cpus[len("pinned:"):].split(",")]
                cpus = cpus[len("pinned:"):]
            env.proxy_cpu = cpus  # an int or a taskset list such as "0,1"; None = not pinned
            where = "any core" if cpus is None else f"core(s) {cpus}"
            if env.pin_workers:
                where += ", one worker per core"
            log(f"=== rpxy with {count} worker(s) on {where}")
            try:
                res = bench_target(env, "rpxy", origin_port)
            except (StartError, RuntimeError, ValueError) as exc:
                log(f"rpxy x{count} FAILED: {exc}")
                res = {"target": "rpxy", "ok": False, "status": "failed", "error": str(exc)}
            res["workers"] = count
            res["cpus"] = ("any" if cpus is None else str(cpus)) + (" (1 per core)" if env.pin_workers else "")
            res["target"] = f"rpxy x{count} on {res['cpus']}"
            results.append(res)
            # the log files are appended to and named by target: keep each step's apart
            for path in [*env.logs.glob("wrk-rpxy-*.log"), *env.logs.glob("rpxy-rps.log")]:
                path.rename(path.with_name(f"step{step}-{path.name}"))
    finally:
        env.proxy_cpu, a.rpxy_workers = saved_cpu, saved_workers
        env.pin_workers = None
    return results


def scaling_table(results: list[dict], env: Env) -> str:
    base = next((r["median_rps"] for r in results if r.get("ok") and r.get("workers") == 1), None)
    head = (
        f"| rpxy workers | cores | req/s (median) | vs 1 worker | p50 ms | p99 ms | peak RSS MiB | proxy CPU % | req/s per proxy core | core{env.load_cpu} busy % | errors |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results:
        if not r.get("ok"):
            rows.append(f"| {r.get('workers', '?')} | {r.get('cpus', '?')} | {r.get('status', 'failed')} | | | | | | | | |")
            continue
        ratio = f"{r['median_rps'] / base:.2f}x" if base else "-"
        rss = r.get("peak_rss_bytes")
        cpu = r.get("median_proxy_cpu_pct")
        # what one fully busy core of workers serves: flat from 1 to N workers = no overhead
        # from having several (what the proxy would scale to with a core of its own per worker)
        per_core = r["median_rps"] / (cpu / 100.0) if cpu else None
        rows.append(
            f"| {r['workers']} | {r['cpus']} | {r['median_rps']:,.0f} | {ratio} | {_fmt(r['median_p50_ms'], '.2f')} | "
            f"{_fmt(r['median_p99_ms'], '.2f')} | {_fmt(rss / MiB if rss else None, '.1f')} | "
            f"{_fmt(cpu)} | {_fmt(per_core, ',.0f')} | {_fmt(r.get('median_load_core_busy_pct'))} | {r['errors']} |"
        )
    return head + "\n".join(rows)


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def _fmt(x: object, spec: str = "") -> str:
    if x is None:
        return "-"
    return format(x, spec) if spec else str(x)


def throughput_table(results: list[dict], env: Env) -> str:
    nginx = next((r for r in results if r["target"] == "nginx" and r.get("ok")), None)
    base = nginx["median_rps"] if nginx else None
    pc, lc = env.proxy_cpu, env.load_cpu
    h2 = env.args.proto != "h1"
    # h2load reports no percentiles: mean and max of the per-request time instead of p50 / p99
    lat_cols, lat_keys = (("mean ms", "max ms"), ("median_mean_ms", "median_max_ms")) if h2 else (
        ("p50 ms", "p99 ms"), ("median_p50_ms", "median_p99_ms"))  # fmt: skip
    head = (
        f"| target | req/s (median) | vs nginx | {lat_cols[0]} | {lat_cols[1]} | peak RSS MiB | proxy CPU % | core{pc} busy % | core{lc} busy % | errors |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results:
        if not r.get("ok"):
            rows.append(f"| {r['target']} | {r.get('status', 'failed')} | | | | | | | | |")
            continue
        ratio = f"{r['median_rps'] / base:.2f}x" if base else "-"
        rss = r.get("peak_rss_bytes")
        rows.append(
            f"| {r['target']} | {r['median_rps']:,.0f} | {ratio} | {_fmt(r[lat_keys[0]], '.2f')} | {_fmt(r[lat_keys[1]], '.2f')} | "
            f"{_fmt(rss / MiB if rss else None, '.1f')} | {_fmt(r.get('median_proxy_cpu_pct'))} | "
            f"{_fmt(r.get('median_proxy_core_busy_pct'))} | {_fmt(r.get('median_load_core_busy_pct'))} | {r['errors']} |"
        )
    return head + "\n".join(rows)


def throughput_notes(results: list[dict], env: Env) -> list[str]:
    notes = []
    for r in results:
        if not r.get("ok"):
            if r.get("error"):
                notes.append(f"{r['target']} failed: {r['error'].strip().splitlines()[0]} (full error in the JSON)")
            continue
        load = r.get("median_load_core_busy_pct")
        pcpu = r.get("median_proxy_cpu_pct")
        core = r.get("median_proxy_core_busy_pct")
        task = r.get("median_proxy_core_task_pct")
        disturbed = task is not None and task - (pcpu or 0) > 10
        if disturbed:
            notes.append(
                f"{r['target']}: processes on core {env.proxy_cpu} used {task}% but the proxy only {pcpu or 0}% -- "
                "other processes ran on the proxy's core: this target's numbers are disturbed, rerun on a quiet machine."
            )
        elif r["target"] != "direct" and core is not None:
            if core >= 95:
                notes.append(
                    f"{r['target']}: proxy-bound (core {env.proxy_cpu} {core}% busy: the proxy's processes {pcpu}%, "
                    "the rest mostly kernel network softirq work)."
                )
            elif load is not None and load >= 95:
                notes.append(
                    f"{r['target']}: load-bound: the load core ({'h2load' if env.args.proto != 'h1' else 'wrk'} + origin) was saturated ({load}%) while the proxy's "
                    f"core was {core}% busy -- its req/s is a lower bound, limited by the load side, not by the proxy."
                )
        if r["errors"]:
            notes.append(f"{r['target']}: {r['errors']} errors (socket errors or non-2xx/3xx) -- see the JSON.")
        if env.args.proto == "h1" and any(run.get("requests") == 0 for run in r["runs"]):
            notes.append(
                f"{r['target']}: wrk completed no request in some run: it could not parse the responses "
                "(wrk counts that as read errors) -- check `curl -v` through the proxy for malformed/duplicate headers."
            )
        for w in r.get("warnings", []):
            notes.append(f"{r['target']}: {w}")
    return notes


# --------------------------------------------------------------------------- big transfers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 256M)")
    mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def run_curl_measured(env: Env, proc: subprocess.Popen, argv: list[str], tag: str) -> dict:
    a = env.args
    sid = proc.pid
    idle = current_rss(sid)
    sampler = MemSampler(sid, a.big_sample_interval)
    sampler.start()
    out_path = env.log_path(f"curl-{tag}")
    t0 = time.monotonic()
    curl = env.procs.start("curl", argv, out_path, cpu=env.load_cpu)
    try:
        curl.wait(a.big_timeout + 30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        env.procs.stop(curl)
        sampler.stop()
    wall = time.monotonic() - t0
    text = out_path.read_text(errors="replace").strip()
    res: dict = {
        "curl_exit": curl.returncode,
        "curl_output": text[-2000:],
        "seconds": round(wall, 2),
        "idle_rss_bytes": idle,
        "peak_rss_bytes": sampler.peak_rss,
        "peak_pss_bytes": sampler.peak_pss,
        "rss_samples": sampler.samples,
        "proxy_alive_after": proc.poll() is None,
    }
    m = re.search(r"RESULT code=(\d+) size=(\d+) time=([\d.]+)", text)
    if m:
        res["http_code"] = int(m.group(1))
        res["bytes"] = int(m.group(2))
        res["seconds"] = float(m.group(3))
    return res


def big_target(env: Env, name: str, origin_port: int, sink_port: int, big_name: str, upload_file: Path) -> dict:
    a = env.args
    size = a.big_size
    limit = a.rss_limit_mb * MiB
    out: dict = {"target": name}
    wfmt = "\\nRESULT code=%{http_code} size=%{SIZE} time=%{time_total}\\n"

    # ---- download
    proc, port = start_proxy(env, name, origin_port, "download", BODY_SIZE)
    try:
        log(f"{name}: downloading {size / MiB:.0f} MiB through it")
        argv = [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            str(a.big_timeout),
            "-H",
            f"Host: {HOST_HEADER}",
            *(["--limit-rate", str(a.throttle)] if a.throttle else []),
            "-w",
            wfmt.replace("SIZE", "size_download"),
            f"http://127.0.0.1:{port}/{big_name}",
        ]
        d = run_curl_measured(env, proc, argv, f"{name}-download")
        d["ok"] = d.get("http_code") == 200 and d.get("bytes") == size and d["curl_exit"] == 0
    finally:
        env.procs.stop(proc)
    d["rss_pass"] = d["peak_rss_bytes"] <= limit
    out["download"] = d
    log(_big_line(name, "download", d, size))

    # ---- upload
    extra = "request_max_body_size = 0" if name == "rpxy" else ""
    proc, port = start_proxy(env, name, sink_port, "upload", None, rpxy_extra=extra)
    try:
        log(f"{name}: uploading {size / MiB:.0f} MiB through it")
        resp = env.tmp / f"upload-response-{name}.txt"
        argv = [
            "curl",
            "-sS",
            "-T",
            str(upload_file),
            "-o",
            str(resp),
            "--max-time",
            str(a.big_timeout),
            "-H",
            f"Host: {HOST_HEADER}",
            "-w",
            wfmt.replace("SIZE", "size_upload"),
            f"http://127.0.0.1:{port}/upload",
        ]
        u = run_curl_measured(env, proc, argv, f"{name}-upload")
        try:
            u["origin_received"] = int(resp.read_text().strip())
        except (OSError, ValueError):
            u["origin_received"] = None
        u["ok"] = u.get("http_code") == 200 and u.get("origin_received") == size and u["curl_exit"] == 0
    finally:
        env.procs.stop(proc)
    u["rss_pass"] = u["peak_rss_bytes"] <= limit
    out["upload"] = u
    log(_big_line(name, "upload", u, size))
    out["ok"] = True
    return out


def _big_line(name: str, kind: str, r: dict, size: int) -> str:
    return (
        f"{name} {kind}: {'OK' if r['ok'] else 'FAILED'} code={r.get('http_code')} bytes={r.get('bytes')} "
        f"in {r['seconds']}s, peak RSS {r['peak_rss_bytes'] / MiB:.1f} MiB (idle {r['idle_rss_bytes'] / MiB:.1f})"
    )


def big_table(results: list[dict], env: Env) -> str:
    limit = env.args.rss_limit_mb
    head = (
        f"| target | test | transfer | MiB/s | seconds | idle RSS MiB | peak RSS MiB | peak <= {limit} MiB |\n"
        "|---|---|---|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for r in results:
        if not r.get("ok"):
            rows.append(f"| {r['target']} | - | {r.get('status', 'failed')} | | | | | |")
            continue
        for kind in ("download", "upload"):
            x = r[kind]
            mibs = (x.get("bytes") or 0) / MiB / x["seconds"] if x.get("seconds") and x.get("ok") else None
            if x["ok"]:
                transfer = "ok"
            else:
                transfer = f"FAILED (code {x.get('http_code')}, curl exit {x['curl_exit']}, {x.get('bytes')} bytes)"
            rows.append(
                f"| {r['target']} | {kind} | {transfer} | {_fmt(mibs, '.0f')} | {x['seconds']:.2f} | "
                f"{x['idle_rss_bytes'] / MiB:.1f} | {x['peak_rss_bytes'] / MiB:.1f} | {'PASS' if x['rss_pass'] else 'FAIL'} |"
            )
    return head + "\n".join(rows)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark rpxy against nginx, HAProxy and Caddy (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--only",
        help=f"comma-separated targets, from {','.join(ALL_TARGETS)} (default: {','.join(PROXY_TARGETS)}; rpxy only with --big-download)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 run of 3 s, 1 s warmup (128 MiB in --big-download)")
    p.add_argument("--runs", type=int, default=3, help="wrk runs per target")
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=2, help="seconds of discarded wrk warmup per target (0 = none)")
    p.add_argument("-c", "--connections", type=int, default=None, help="wrk / h2load connections (default 50; 10 with --h2/--h2c)")
    p.add_argument("-t", "--threads", type=int, default=1, help="wrk / h2load threads")
    h2g = p.add_mutually_exclusive_group()
    h2g.add_argument(
        "--h2", action="store_true", help="HTTP/2 over TLS (ALPN h2, throwaway localhost cert), loaded with h2load instead of wrk"
    )
    h2g.add_argument("--h2c", action="store_true", help="cleartext HTTP/2 with prior knowledge, loaded with h2load")
    p.add_argument(
        "-n", "--requests", type=int, default=None, help="h2load requests per run (--h2/--h2c; default 100000, 20000 with --quick)"
    )
    p.add_argument("-m", "--streams", type=int, default=10, help="h2load max concurrent streams per connection (-m)")
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=None,
        help="h2load requests of discarded warmup per target (--h2/--h2c; default 5000, 2000 with --quick; 0 = none)",
    )
    p.add_argument("--proxy-cpu", type=int, default=0, help="core the proxy is pinned to")
    p.add_argument("--load-cpu", type=int, default=1, help="core for origin, wrk/curl and this script")
    p.add_argument("--sample-interval", type=float, default=0.1, help="RSS sampling period (s) during wrk runs")
    p.add_argument("--start-timeout", type=float, default=30, help="seconds to wait for a proxy to answer")
    p.add_argument("--rpxy-cmd", default=str(DEFAULT_RPXY), help="command that starts rpxy (gets --config FILE [--log-dir DIR])")
    p.add_argument(
        "--rpxy-no-log-dir", action="store_true", help="do not pass --log-dir to rpxy (its logs go to its stdout log file)"
    )
    p.add_argument(
        "--rpxy-extra",
        action="append",
        default=[],
        metavar="TOML_LINE",
        help="extra top-level line for rpxy's config.toml (repeatable)",
    )
    p.add_argument(
        "--rpxy-workers",
        type=int,
        default=1,
        metavar="N",
        help="rpxy worker processes (rpxy --workers N); they inherit the proxy's pinning, see --scaling",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="rpxy only: 1 worker on --proxy-cpu, 2 workers (or --rpxy-workers N) on the same core, then 2 workers "
        "on --scaling-cpus; origin + wrk on --load-cpu; reports the req/s ratios (see bench/README.md)",
    )
    p.add_argument(
        "--scaling-cpus",
        default=None,
        metavar="LIST",
        help="taskset CPU list of the last --scaling step (default: proxy core + load core; 'all' = not pinned)",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="cached-response mode: the origin's page is cacheable and each proxy's cache is on "
        f"(rpxy [experimental.cache], nginx proxy_cache); wrk measures hits/s. Targets: {','.join(CACHE_TARGETS)}",
    )
    p.add_argument(
        "--big-download", action="store_true", help="big-transfer mode: 1 GiB download + 1 GiB upload, peak RSS vs limit"
    )
    p.add_argument("--big-size", type=parse_size, default=None, help="size of the big transfer (default 1G, 128M with --quick)")
    p.add_argument("--rss-limit-mb", type=float, default=100, help="peak RSS limit for --big-download, in MiB")
    p.add_argument(
        "--throttle",
        type=parse_size,
        default=0,
        metavar="RATE",
        help="with --big-download: slow consumer, e.g. 50M = 50 MiB/s (curl --limit-rate on download, a slow-reading "
        "origin on upload), so a proxy without backpressure must buffer; 0 = full speed",
    )
    p.add_argument("--big-timeout", type=int, default=900, help="curl --max-time for each big transfer")
    p.add_argument("--big-sample-interval", type=float, default=0.05, help="RSS sampling period (s) during big transfers")
    p.add_argument("--no-install", action="store_true", help="never run apt-get; fail if a tool is missing")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/<timestamp>.json")
    args = p.parse_args(argv)
    args.proto = "h2" if args.h2 else "h2c" if args.h2c else "h1"
    if args.connections is None:
        args.connections = 50 if args.proto == "h1" else 10
    if args.requests is None:
        args.requests = 20000 if args.quick else 100000
    if args.warmup_requests is None:
        args.warmup_requests = 2000 if args.quick else 5000
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 3, 1
    if args.big_size is None:
        args.big_size = 128 * MiB if args.quick else 1024 * MiB
    if args.only:
        targets = [t.strip() for t in args.only.split(",") if t.strip()]
        bad = [t for t in targets if t not in ALL_TARGETS]
        if bad:
            p.error(f"unknown targets {bad}; choose from {ALL_TARGETS}")
        args.targets = targets
    else:
        args.targets = ["rpxy"] if args.big_download else list(CACHE_TARGETS) if args.cache else list(PROXY_TARGETS)
    if args.scaling:
        if args.big_download or args.cache or args.proto != "h1":
            p.error("--scaling is its own mode (HTTP/1.1 with wrk)")
        args.targets = ["rpxy"]
    if args.rpxy_workers < 1:
        p.error("--rpxy-workers must be >= 1")
    if args.cache and (args.big_download or args.proto != "h1"):
        p.error("--cache is its own mode (HTTP/1.1 with wrk)")
    if args.cache and any(t not in CACHE_TARGETS for t in args.targets):
        p.error(f"--cache compares {CACHE_TARGETS} only")
    if args.big_download and "direct" in args.targets:
        p.error("'direct' is not a proxy; it has no meaning with --big-download")
    if args.proto != "h1" and args.big_download:
        p.error("--h2/--h2c and --big-download are separate modes")
    if args.proto != "h1" and "direct" in args.targets:
        p.error("'direct' has no meaning with --h2/--h2c: the origin speaks HTTP/1.1 only")
    if args.proto != "h1" and (args.requests < 1 or args.threads > args.connections):
        p.error("--requests must be >= 1 and --threads <= --connections")
    if args.runs < 1 or args.duration < 1:
        p.error("--runs and --duration must be >= 1")
    return args


def setup_cpus(args: argparse.Namespace) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if args.proxy_cpu not in cpus or args.load_cpu not in cpus or args.proxy_cpu == args.load_cpu:
        log(
            f"warning: cannot pin proxy to core {args.proxy_cpu} and load to core {args.load_cpu} (available: {cpus}); running unpinned"
        )
        args.proxy_cpu = args.load_cpu = None
        return
    # this script (and its RSS sampler) stays off the proxy's core
    os.sched_setaffinity(0, {args.load_cpu})


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    want = min(want, 1 << 20)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def machine_info(args: argparse.Namespace) -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {
        "nginx": cmd_output(["nginx", "-v"]),
        "haproxy": cmd_output(["haproxy", "-v"]),
        "caddy": cmd_output(["caddy", "version"]),
        "wrk": cmd_output(["wrk", "-v"]),
        "curl": cmd_output(["curl", "--version"]),
    }
    if args.proto != "h1":
        versions["h2load"] = cmd_output(["h2load", "--version"])
        versions["openssl"] = cmd_output(["openssl", "version"])
    if "rpxy" in args.targets and rpxy_available(args) is None:
        versions["rpxy"] = cmd_output([*shlex.split(args.rpxy_cmd), "--version"], timeout=20)
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_json(args: argparse.Namespace, payload: dict, suffix: str) -> Path | None:
    if args.no_json:
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{payload['timestamp'].replace(':', '').replace('-', '')}{suffix}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    if "--h3" in (sys.argv[1:] if argv is None else argv):
        from h3bench import main as h3_main  # HTTP/3 against Caddy: its own mode, see bench/h3bench.py

        return h3_main(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("Linux only (uses /proc and taskset)")
    ensure_packages(args.no_install, PACKAGES if args.proto == "h1" else H2_PACKAGES)
    setup_cpus(args)
    raise_nofile()
    # Ctrl-C -> KeyboardInterrupt even if SIGINT was inherited as ignored (background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_sigterm)

    started = _dt.datetime.now().astimezone()
    payload: dict = {
        "timestamp": started.strftime("%Y-%m-%dT%H:%M:%S"),
        "mode": "big-download"
        if args.big_download
        else "throughput-cache"
        if args.cache
        else "throughput"
        if args.proto == "h1"
        else f"throughput-{args.proto}",
        "machine": machine_info(args),
        "params": {k: v for k, v in vars(args).items() if k not in ("only",)},
        "results": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="rpxy-bench-"))
    # nginx workers run as an unprivileged user when started as root: they must be able to read the docroot
    tmp.chmod(0o755)
    procs = Procs()
    env = Env(args, tmp, procs)
    results: list[dict] = payload["results"]
    interrupted = False
    log(f"temp dir {tmp}; proxy core {args.proxy_cpu}, load core {args.load_cpu}; targets {','.join(args.targets)}")
    try:
        origin, origin_port = start_origin_nginx_cache(env) if args.cache else start_origin_nginx(env)
        log(f"origin nginx on 127.0.0.1:{origin_port}")
        if args.proto == "h2":
            env.tls = make_certs(tmp)
            log(f"throwaway CA + localhost certificate in {tmp / 'tls'}")
        if args.big_download:
            big_name = "big.bin"
            os.truncate(_touch(tmp / "docroot" / big_name), args.big_size)
            upload_file = _touch(tmp / "upload.bin")
            os.truncate(upload_file, args.big_size)
            _sink, sink_port = start_sink(env)
            log(f"upload sink on 127.0.0.1:{sink_port}; transfer size {args.big_size} bytes")
        for name in args.targets:
            if name == "rpxy" and (why := rpxy_available(args)):
                log(f"skipping rpxy: {why}")
                results.append({"target": name, "ok": False, "status": f"skipped: {why}"})
                continue
            log(f"=== {name}")
            try:
                if args.big_download:
                    results.append(big_target(env, name, origin_port, sink_port, big_name, upload_file))
                elif args.scaling:
                    results.extend(scaling_targets(env, origin_port))
                else:
                    results.append(bench_target(env, name, origin_port))
            except (StartError, RuntimeError, ValueError) as exc:
                log(f"{name} FAILED: {exc}")
                results.append({"target": name, "ok": False, "status": "failed", "error": str(exc)})
            if origin.poll() is not None:
                raise RuntimeError(f"origin died:\n{tail(origin.bench_log)}")  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping everything")
    except (StartError, RuntimeError) as exc:
        log(f"aborting: {exc}")
        payload["error"] = str(exc)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep_tmp:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    payload["finished"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M:%S")
    payload["interrupted"] = interrupted
    if args.big_download:
        table = big_table(results, env)
        notes = [
            f"{r['target']} failed: {r['error'].strip().splitlines()[0]} (full error in the JSON)"
            for r in results
            if not r.get("ok") and r.get("error")
        ]
    elif args.scaling:
        table = scaling_table(results, env)
        notes = [f"{r['target']} failed: {r.get('error', '')}" for r in results if not r.get("ok")]
    else:
        table = throughput_table(results, env)
        notes = throughput_notes(results, env)
    payload["table_markdown"] = table
    payload["notes"] = notes
    print()
    if args.big_download:
        rate = f", consumer throttled to {args.throttle / MiB:g} MiB/s" if args.throttle else ""
        print(
            f"Big transfer: {args.big_size / MiB:.0f} MiB{rate}, proxy on core {args.proxy_cpu}, curl/origin on core {args.load_cpu}\n"
        )
    elif args.proto != "h1":
        over = "TLS (ALPN h2)" if args.proto == "h2" else "cleartext h2c (prior knowledge)"
        print(
            f"h2load -n {args.requests} -c {args.connections} -m {args.streams} -t {args.threads} over {over}, "
            f"{args.runs} run(s) per target after {args.warmup_requests} warmup requests, "
            f"proxy on core {args.proxy_cpu}, origin+h2load on core {args.load_cpu}; "
            "mean/max ms = h2load's per-request time (it reports no percentiles), median over the runs\n"
        )
    else:
        cached = "; every response a cache hit (origin: max-age=3600; rpxy [experimental.cache], nginx proxy_cache)" if args.cache else ""
        placement = "proxy placement per row" if args.scaling else f"proxy on core {args.proxy_cpu}"
        print(
            f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, {args.runs} run(s) per target, "
            f"{placement}, origin+wrk on core {args.load_cpu}{cached}\n"
        )
    if interrupted:
        print("INTERRUPTED: partial results (the target running at the time is not included)\n")
    print(table)
    if notes:
        print()
    for n in notes:
        print(f"- {n}")
    suffix = "-big" if args.big_download else "-cache" if args.cache else "-scaling" if args.scaling else "" if args.proto == "h1" else f"-{args.proto}"
    path = write_json(args, payload, suffix)
    if path:
        print(f"\nJSON: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if interrupted:
        return 130
    good = all(r.get("ok") or str(r.get("status", "")).startswith("skipped") for r in results)
    if args.big_download:
        good = good and all(r[k]["ok"] and r[k]["rss_pass"] for r in results if r.get("ok") for k in ("download", "upload"))
    return 0 if good else 1


def _touch(path: Path) -> Path:
    path.touch()
    return path


if __name__ == "__main__":
    sys.exit(main())
