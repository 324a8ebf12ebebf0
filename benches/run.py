#!/usr/bin/env python3
"""wharf benchmark harness: one command that measures wharf on the test corpus
and compares it with the tools a user could use instead.

    python3 benches/run.py [--tier small|large] [--corpus DIR] [--out benches/RESULTS.md]
                           [--only wharf|peers|garage|scale|all] [--scenarios a,b] [--formats a,b]
                           [--quick] [--no-transfer] [--no-garage] [--garage BIN] [--no-scale]
                           [--scale-gb N]

It writes benches/RESULTS.md, benches/bytes.png and benches/results.json (raw
figures), all regenerated wholesale on every run (--only garage / --only scale:
RESULTS-garage.md and results-garage.json / RESULTS-scale.md and results-scale.json
instead). See benches/README.md. The object-store figures start Garage clusters with
benches/garage.py; the scale figures build a multi-GB image from the corpus.

Python 3.11, standard library only. External tools (zstd, b3sum, openssl, gzip,
xdelta3, rsync, casync, borg, restic, gnuplot) are installed with apt-get when
missing and the harness runs as root; bita is installed with `cargo install` into
a cache (BITA_ROOT); a tool that cannot be had is reported as "not available".
"""

import argparse
import hashlib
import http.server
import io
import json
import os
import platform
import random
import resource
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
T0 = time.monotonic()

# command -> Debian package
APT = {
    "zstd": "zstd", "b3sum": "b3sum", "openssl": "openssl", "gzip": "gzip",
    "xdelta3": "xdelta3", "rsync": "rsync", "casync": "casync", "borg": "borgbackup",
    "restic": "restic", "gnuplot": "gnuplot-nox", "cargo": None, "bita": None,
    "mmdebstrap": "mmdebstrap", "pigz": "pigz", "skopeo": "skopeo",
}
# What ../shared/corpus/build_corpus.py runs, installed before it builds a missing corpus.
CORPUS_TOOLS = ["mmdebstrap", "pigz", "skopeo"]
LIMIT_TOOLS = ["zstd", "b3sum", "openssl"]
PEER_TOOLS = ["zstd", "gzip", "xdelta3", "rsync", "casync", "borg", "restic", "bita"]
# bita (crates.io) is not packaged by Debian: when missing, `cargo install --locked` builds this version into
# BITA_ROOT (bin/bita), which later runs reuse. About 10 minutes on 2 cores, once.
BITA_VERSION = "0.15.0"
BITA_ROOT = os.environ.get("WHARF_BITA_ROOT") or os.path.expanduser("~/.cache/wharf-bench/bita")

TIERS = {
    "small": {"formats": ["legacy", "oci", "oci-gzip-py", "oci-gzip-pigz"],
              "scenarios": ["app-change", "rebuild", "dep-bump", "base-upgrade"]},
    "large": {"formats": ["oci"],
              "scenarios": ["dep-bump", "major-upgrade", "app-change", "rebuild"]},
}
CHUNK_KIB = [8, 16, 32, 64]
RESTIC_PASSWORD = "wharf-bench"   # matches benches/restic-template (a fixed chunker polynomial)


def log(msg):
    el = time.monotonic() - T0
    print(f"[{int(el) // 60:3d}:{int(el) % 60:02d}] {msg}", file=sys.stderr, flush=True)


def q(cmd):
    return shlex.join(str(c) for c in cmd)


class Failed(Exception):
    pass


# ---------------------------------------------------------------- measuring

# Run by measure(exact=True): starts the command from a small process (python -S -I, ~9 MB) and writes its
# wall seconds, CPU seconds and ru_maxrss to argv[1]. A child started by this harness directly reports at
# least the harness's own peak RSS (~35 MB: Python starts children with vfork, and exec records the high-water
# mark of the memory it replaces), which would hide anything wharf uses below that.
RSS_HELPER = """import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, st, ru = os.wait4(pid, 0)
t = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    f.write(f"{t} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(st))
"""


def measure(cmd, stdout=None, stdin=None, env=None, cwd=None, check=True, timeout=None, exact=False):
    """Run cmd; return wall seconds, CPU seconds and peak RSS (KB) of it and its children.

    stdout: None (discarded to /dev/null), a path (written there), or "capture"
    (returned as text in "out"). Peak RSS is ru_maxrss from wait4(), the largest
    resident set of the process and the children it waited for. timeout: seconds
    after which the process is killed (SIGKILL, by its pid) and the run fails.
    exact: start cmd through RSS_HELPER, so that its peak RSS is its own rather than at least this
    process's (see RSS_HELPER); times are then the helper's of its child, without its own start-up."""
    cmd = [str(c) for c in cmd]
    if exact:
        assert not timeout, "measure(exact=True) cannot kill the command itself"
        fd, figs = tempfile.mkstemp(prefix="wharf-bench-rss-")
        os.close(fd)
        try:
            r = measure([sys.executable, "-S", "-I", "-c", RSS_HELPER, figs, *cmd], stdout, stdin, env, cwd,
                        check=False)
            with open(figs) as f:
                got = f.read().split()
        finally:
            os.unlink(figs)
        if len(got) == 3:
            r["secs"], r["cpu"], r["rss_kb"] = float(got[0]), float(got[1]), int(got[2])
        r["cmd"] = q(cmd)
        if check and r["rc"] != 0:
            raise Failed(f"`{q(cmd)}` exited {r['rc']}: {r['err'].strip()[-600:]}")
        return r
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile() as errf, tempfile.TemporaryFile() as capf:
        if stdout is None:
            outf = open(os.devnull, "wb")
        elif stdout == "capture":
            outf = None
        else:
            outf = open(stdout, "wb")
        inf = open(stdin, "rb") if stdin else subprocess.DEVNULL
        try:
            t = time.perf_counter()
            p = subprocess.Popen(cmd, stdin=inf, stdout=outf if outf else capf, stderr=errf,
                                 env=full_env, cwd=cwd)
            killer = threading.Timer(timeout, p.kill) if timeout else None
            if killer:
                killer.start()
            try:
                _, status, ru = os.wait4(p.pid, 0)
            finally:
                if killer:
                    killer.cancel()
            secs = time.perf_counter() - t
            p.returncode = os.waitstatus_to_exitcode(status)
        except FileNotFoundError as e:
            raise Failed(f"{cmd[0]}: not found") from e
        finally:
            if outf:
                outf.close()
            if stdin:
                inf.close()
        errf.seek(0)
        err = errf.read().decode(errors="replace")
        capf.seek(0)
        out = capf.read().decode(errors="replace")
    r = {"cmd": q(cmd), "rc": p.returncode, "secs": secs, "cpu": ru.ru_utime + ru.ru_stime,
         "rss_kb": ru.ru_maxrss, "err": err[-2000:], "out": out}
    if check and p.returncode != 0:
        why = f" (killed after {timeout} s)" if timeout and secs >= timeout else ""
        raise Failed(f"`{q(cmd)}` exited {p.returncode}{why}: {err.strip()[-600:]}")
    return r


def warm(*paths):
    """Read files once so that the timed command after finds them in the page cache, and write back what earlier
    steps left dirty. Without the reads, whichever tool reads an input first pays for the disk (seen: wharf's add
    of legacy/app-change v2 took 1.18 s cold, 0.50 s warm, 0.7 s of it system time), and the comparison depends
    on the order the tools run in; without the sync, a command that fsyncs (wharf's extract -o FILE) waits for
    the writeback of whatever ran before it (seen: 1.5 s instead of 0.85 s while a build's output was written)."""
    for p in paths:
        measure(["cat", p])
    os.sync()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tree_bytes(path, sub=None):
    """Sum of file sizes (apparent, st_size) under path, or under path/sub."""
    top = os.path.join(path, sub) if sub else path
    total = 0
    for root, _, files in os.walk(top):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def file_sizes(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[p] = os.lstat(p).st_size
    return out


def rm(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def fresh_dir(path):
    rm(path)
    os.makedirs(path)
    return path


class DiskPeak:
    """Samples the apparent size of the scratch directory once a second; keeps the peak."""

    def __init__(self, path):
        self.path, self.peak, self.stop = path, 0, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.wait(1.0):
            try:
                self.peak = max(self.peak, tree_bytes(self.path))
            except OSError:
                pass

    def done(self):
        self.stop.set()
        self.t.join()
        return self.peak


def busy_cpu_secs():
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def my_cpu_secs():
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class CpuMeter:
    """How much CPU other processes used while a section ran: machine busy time minus ours."""

    def __init__(self):
        self.t, self.busy, self.mine = time.monotonic(), busy_cpu_secs(), my_cpu_secs()

    def stop(self):
        wall = time.monotonic() - self.t
        busy = busy_cpu_secs()
        if busy is None or self.busy is None:
            return None
        other = max(0.0, (busy - self.busy) - (my_cpu_secs() - self.mine))
        return {"wall": round(wall, 1), "other_cpu": round(other, 1),
                "other_share": round(other / max(wall, 1e-6) / (os.cpu_count() or 1), 3)}


def median(xs):
    return statistics.median(xs) if xs else None


def load():
    return os.getloadavg()


# ---------------------------------------------------------------- environment

class Tools:
    def __init__(self, install):
        self.install = install and os.geteuid() == 0
        self.cargo_install = bool(install)   # cargo install --root needs no root
        self.why_not = "" if self.install else (" (--no-install)" if install is False else " (not root: cannot apt-get install)")
        self.updated = False
        self.notes = {}
        self.bita_found = False

    def have(self, cmd):
        if cmd == "bita":
            return self.have_bita()
        if shutil.which(cmd):
            return True
        if cmd in self.notes:
            return False
        pkg = APT.get(cmd)
        if self.install and pkg:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            if not self.updated:
                log("apt-get update")
                subprocess.run(["apt-get", "update", "-qq"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.updated = True
            log(f"installing {pkg} (for {cmd})")
            subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if cmd == "b3sum" and not shutil.which(cmd) and self.install and shutil.which("cargo"):
            log("installing b3sum from crates.io")
            subprocess.run(["cargo", "install", "--quiet", "b3sum"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cb = os.path.expanduser("~/.cargo/bin")
            if os.path.exists(os.path.join(cb, "b3sum")):
                os.environ["PATH"] += os.pathsep + cb
        if shutil.which(cmd):
            return True
        self.notes[cmd] = f"{cmd} not available" + self.why_not
        return False

    def have_bita(self):
        """bita BITA_VERSION: BITA_ROOT/bin/bita, installed there with cargo when missing (or of another version),
        else a bita already on PATH (whatever its version: RESULTS.md states it). BITA_ROOT/bin goes first on PATH."""
        if "bita" in self.notes:
            return False
        if self.bita_found:
            return True
        exe = os.path.join(BITA_ROOT, "bin", "bita")
        why = ""
        if self.bita_version(exe) != BITA_VERSION:
            if not self.cargo_install:
                why = f"; not installed into {BITA_ROOT} (--no-install)"
            elif not shutil.which("cargo"):
                why = f"; cargo not found, so not installed into {BITA_ROOT}"
            else:
                log(f"installing bita {BITA_VERSION} from crates.io into {BITA_ROOT} "
                    "(cargo install --locked; a few minutes on 2 cores, once)")
                os.makedirs(os.path.dirname(BITA_ROOT), exist_ok=True)
                # a target dir of its own (never a CARGO_TARGET_DIR from the environment), removed afterwards
                build = tempfile.mkdtemp(prefix="bita-build-", dir=os.path.dirname(BITA_ROOT))
                try:
                    p = subprocess.run(["cargo", "install", "--locked", "--quiet", "--version", BITA_VERSION,
                                        "--root", BITA_ROOT, "bita"], env=dict(os.environ, CARGO_TARGET_DIR=build),
                                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
                finally:
                    rm(build)
                if p.returncode != 0:
                    why = f"; cargo install bita {BITA_VERSION} failed: {p.stderr.strip()[-300:]}"
                    log(f"bita: cargo install failed: {p.stderr.strip()[-600:]}")
        if self.bita_version(exe):
            os.environ["PATH"] = os.path.dirname(exe) + os.pathsep + os.environ.get("PATH", "")
            self.bita_found = True
            return True
        if shutil.which("bita"):   # another version on PATH: better than none; its version is reported
            self.bita_found = True
            return True
        self.notes["bita"] = f"bita not available{why}"
        return False

    @staticmethod
    def bita_version(exe):
        if not os.path.isfile(exe):
            return None
        try:
            p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        m = re.search(r"(\d+\.\d+\.\d+)", p.stdout)
        return m.group(1) if p.returncode == 0 and m else None

    def version(self, cmd):
        if not shutil.which(cmd):
            return "not available"
        args = {"zstd": ["-V"], "b3sum": ["--version"], "openssl": ["version"], "gzip": ["--version"],
                "xdelta3": ["-V"], "rsync": ["--version"], "casync": ["--version"], "borg": ["--version"],
                "restic": ["version"], "gnuplot": ["--version"], "pigz": ["--version"]}.get(cmd, ["--version"])
        try:
            p = subprocess.run([cmd] + args, capture_output=True, text=True, timeout=30)
            txt = (p.stdout + p.stderr).strip().splitlines()
            line = txt[0].strip() if txt else "?"
            m = re.search(r"v?(\d+(?:\.\d+)+)", line) or re.search(r"(\d+)", line)
            return m.group(1) if m else line
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"


def machine_info():
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["mem_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        with open("/etc/debian_version") as f:
            info["debian"] = f.read().strip()
    except OSError:
        pass
    return info


def find_builder():
    cands = [os.environ.get("WHARF_CORPUS_BUILDER", ""),
             os.path.join(os.path.dirname(REPO), "shared", "corpus", "build_corpus.py"),
             "/work/shared/corpus/build_corpus.py"]
    for c in cands:
        if c and os.path.exists(c):
            return c
    return None


def load_corpus(corpus, tier, formats, scenarios, build, tools=None):
    man = os.path.join(corpus, "corpus.json")

    def pairs_from():
        if not os.path.exists(man):
            return None, ["corpus.json missing"]
        with open(man) as f:
            images = json.load(f)["images"]
        got, missing = {}, []
        for fmt in formats:
            for s in scenarios:
                ents = {e["version"]: e for e in images
                        if e["tier"] == tier and e["format"] == fmt and e["scenario"] == s}
                if "v1" not in ents or "v2" not in ents:
                    missing.append(f"{fmt}/{s}")
                    continue
                for e in (ents["v1"], ents["v2"]):
                    p = os.path.join(corpus, e["file"])
                    if not os.path.exists(p) or os.path.getsize(p) != e["size"]:
                        missing.append(e["file"])
                got[(fmt, s)] = (ents["v1"], ents["v2"])
        return got, missing

    got, missing = pairs_from()
    if missing:
        if not build:
            raise SystemExit(f"corpus incomplete at {corpus}: {missing[:5]} (run without --no-build-corpus)")
        b = find_builder()
        if not b:
            raise SystemExit(f"corpus incomplete at {corpus} and build_corpus.py not found (set WHARF_CORPUS_BUILDER)")
        for c in CORPUS_TOOLS if tools else ():
            tools.have(c)
        cmd = [sys.executable, b, "--tier", tier, "--out", corpus,
               "--formats", ",".join(formats), "--scenarios", ",".join(scenarios)]
        log(f"corpus incomplete ({missing[:3]}...): building it: {q(cmd)}")
        subprocess.run(cmd, check=True)
        got, missing = pairs_from()
        if missing:
            raise SystemExit(f"corpus still incomplete after building: {missing[:5]}")
    return got


def wharf_binary(args, work):
    src = args.wharf or os.path.join(REPO, "target", "release", "wharf")
    if not os.path.exists(src) or args.build:
        for attempt in range(1, 6):
            log(f"building wharf (cargo build --release -p wharf), attempt {attempt}")
            p = subprocess.run(["cargo", "build", "--release", "-p", "wharf"], cwd=REPO)
            if p.returncode == 0 and os.path.exists(src):
                break
            if attempt == 5:
                raise SystemExit("cargo build failed 5 times; giving up")
            log("build failed (someone may be mid-edit); retrying in 120 s")
            time.sleep(120)
    # Copy it: another engineer may rebuild target/release/wharf while we run.
    dst = os.path.join(work, "bin", "wharf")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)
    info = {"path": src, "sha256": sha256_file(src)[:16],
            "mtime": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(os.path.getmtime(src)))}
    try:
        info["version"] = subprocess.run([dst, "--version"], capture_output=True, text=True).stdout.strip()
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                     capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout
        info["dirty"] = [l[3:] for l in dirty.splitlines() if l.strip()]
    except OSError:
        pass
    return dst, info


# ---------------------------------------------------------------- wharf

class Wharf:
    def __init__(self, exe, exact=False):
        self.exe = exe
        self.exact = exact  # measure(exact=True): peak RSS of wharf itself, not at least the harness's

    def init(self, store, avg_kib=None, level=None):
        rm(store)
        cmd = [self.exe, "--quiet", "--store", store, "init"]
        if avg_kib:
            cmd += ["--avg-chunk-kib", avg_kib]
        if level:
            cmd += ["--zstd-level", level]
        measure(cmd, exact=self.exact)
        with open(os.path.join(store, "config.json")) as f:
            return json.load(f)

    def add(self, store, tar, name):
        before = tree_bytes(store)
        r = measure([self.exe, "--quiet", "--store", store, "add", tar, "--name", name, "--json"], stdout="capture",
                    exact=self.exact)
        r["report"] = json.loads(r.pop("out"))
        r["store_growth"] = tree_bytes(store) - before
        return r

    def extract(self, store, name, out):
        if out == "-":
            return measure([self.exe, "--quiet", "--store", store, "extract", name, "-o", "-"], exact=self.exact)
        return measure([self.exe, "--quiet", "--store", store, "extract", name, "-o", out], exact=self.exact)

    def push(self, store, name, dest, extra=()):
        """`wharf push NAME DEST --json` to a local store: wharf spawns `wharf serve --stdio` on DEST as its
        child, so the wall time and peak RSS cover both ends; the report counts the bytes on their pipe."""
        r = measure([self.exe, "--quiet", "--store", store, "push", name, dest, "--json", *extra], stdout="capture",
                    exact=self.exact)
        r["report"] = json.loads(r.pop("out"))
        return r

    def push_split(self, store, name, dest, stand_in, extra=()):
        """`push` as between two machines of one core each: the sender runs on core 0 and reaches DEST
        through `ssh://`, with $WHARF_SSH set to `stand_in` (SPLIT_SSH), which runs the receiving
        `wharf serve --stdio` here, on core 1. Wall time and peak RSS cover both ends, as in `push`."""
        r = measure(["taskset", "-c", "0", self.exe, "--quiet", "--store", store, "push", name,
                     "ssh://bench" + os.path.abspath(dest), "--json", *extra], stdout="capture",
                    env={"WHARF_SSH": stand_in, "WHARF_REMOTE_BIN": self.exe}, exact=self.exact)
        r["report"] = json.loads(r.pop("out"))
        return r

    def bundle(self, store, name, have, out, extra=()):
        r = measure([self.exe, "--quiet", "--store", store, "bundle", name, "--have", have, "-o", out, "--json",
                     *extra], stdout="capture", exact=self.exact)
        r["report"] = json.loads(r.pop("out"))
        return r

    def unbundle(self, store, path):
        return measure([self.exe, "--quiet", "--store", store, "unbundle", path, "--json"], stdout="capture",
                       exact=self.exact)

    def pull(self, store, src, name, extra=()):
        """`wharf --store STORE pull SRC NAME --json`: for a local SRC, wharf runs `wharf serve --stdio` on it
        as its child, so the wall time and peak RSS cover both ends."""
        r = measure([self.exe, "--quiet", "--store", store, "pull", src, name, "--json", *extra], stdout="capture",
                    exact=self.exact)
        r["report"] = json.loads(r.pop("out"))
        return r


PUSH_KEYS = ("chunks_total", "chunks_sent", "chunks_skipped", "layers_skipped", "payload_bytes", "delta_chunks",
             "delta_bytes", "delta_raw_bytes", "delta_instead_of", "wire_bytes_out", "wire_bytes_in", "seconds")


# A stand-in for ssh (as $WHARF_SSH) that runs the remote command on this machine, pinned to core 1: with the
# sender pinned to core 0, a push then runs as between two machines of one core each (Wharf.push_split).
SPLIT_SSH = """#!/bin/sh
# called as: [options] -- HOST COMMAND
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done
shift 2
exec taskset -c 1 sh -c "$1"
"""


def split_stand_in(work):
    """Writes SPLIT_SSH into `work` and returns its path, or None where the split cannot be made (fewer than 2
    cores, or no taskset)."""
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return None
    path = os.path.join(work, "split-ssh")
    with open(path, "w") as f:
        f.write(SPLIT_SSH)
    os.chmod(path, 0o755)
    return path


def bench_transfer(wh, sender, recv_base, v2, work):
    """What a receiver holding v1 (recv_base) gets for v2 from the sender store (holding v1 and v2).

    Three receivers, each a fresh copy of recv_base: `push` with deltas (the default), `push --no-deltas`,
    and a `bundle --have v1` applied with `unbundle`. Each receiver then rebuilds v2 (`extract -o FILE`),
    whose SHA-256 is compared with corpus.json."""
    out = os.path.join(work, "out.tar")
    rcv = os.path.join(work, "w-recv")
    res = {}

    def receiver():
        rm(rcv)
        shutil.copytree(recv_base, rcv)
        return tree_bytes(rcv)

    def rebuild():
        rm(out)
        ex = wh.extract(rcv, "v2", out)
        ok = sha256_file(out) == v2["sha256"]
        rm(out)
        return ex, ok

    stand_in = split_stand_in(work)

    def push(extra, split=False):
        before = receiver()
        p = wh.push_split(sender, "v2", rcv, stand_in, extra) if split else wh.push(sender, "v2", rcv, extra)
        rep = p["report"]
        growth = tree_bytes(rcv) - before
        ex, ok = rebuild()
        r = {k: rep.get(k) for k in PUSH_KEYS} | {
            "bytes": rep["wire_bytes_out"] + rep["wire_bytes_in"], "secs": p["secs"], "cpu": p["cpu"],
            "rss_kb": p["rss_kb"], "receiver_growth": growth, "rebuild_secs": ex["secs"],
            "rebuild_rss_kb": ex["rss_kb"], "identical": ok}
        log(f"  push{' --no-deltas' if extra else ''}{', one core each end' if split else ''}: "
            f"{r['bytes'] / 1e6:.3f} MB on the pipe, "
            f"{p['secs']:.2f} s, {rep.get('delta_chunks', 0)} of {rep.get('chunks_sent')} chunks as deltas; "
            f"receiver rebuild byte-identical: {ok}")
        return r

    def bundle():
        f = os.path.join(work, "v2.bundle")
        rm(f)
        b = wh.bundle(sender, "v2", "v1", f)
        size = os.path.getsize(f)
        before = receiver()
        u = wh.unbundle(rcv, f)
        growth = tree_bytes(rcv) - before
        rm(f)
        ex, ok = rebuild()
        rep = b["report"]
        log(f"  bundle: {size / 1e6:.3f} MB, {b['secs']:.2f} s; unbundle {u['secs']:.2f} s; "
            f"receiver rebuild byte-identical: {ok}")
        return {k: rep.get(k) for k in PUSH_KEYS} | {
            "bytes": size, "secs": b["secs"], "cpu": b["cpu"], "rss_kb": b["rss_kb"], "unbundle_secs": u["secs"],
            "unbundle_rss_kb": u["rss_kb"], "receiver_growth": growth, "rebuild_secs": ex["secs"],
            "rebuild_rss_kb": ex["rss_kb"], "identical": ok}

    runs = [("push", lambda: push(())), ("push_nodelta", lambda: push(("--no-deltas",))), ("bundle", bundle)]
    if stand_in:
        runs += [("push_split", lambda: push((), True)),
                 ("push_split_nodelta", lambda: push(("--no-deltas",), True))]
    for key, fn in runs:
        try:
            res[key] = fn()
        except (Failed, ValueError, KeyError, OSError) as e:  # a failing transfer must not end the run
            res[key] = {"error": f"{type(e).__name__}: {e}" if not isinstance(e, Failed) else str(e)}
            log(f"  {key}: FAILED: {res[key]['error'][:300]}")
        finally:
            rm(rcv)
            rm(out)
    return res


def bench_wharf_pairs(wh, pairs, formats, scenarios, work, transfer=True):
    res = []
    for fmt in formats:
        scen = [s for s in scenarios if (fmt, s) in pairs]
        by_v1 = {}
        for s in scen:
            by_v1.setdefault(pairs[(fmt, s)][0]["file"], []).append(s)
        for v1file, ss in by_v1.items():
            v1 = pairs[(fmt, ss[0])][0]
            base = os.path.join(work, f"w-{fmt}-base")
            wh.init(base)
            log(f"wharf {fmt}: add v1 ({v1['file']})")
            warm(v1["path"])
            a1 = wh.add(base, v1["path"], "v1")
            recv = os.path.join(work, f"w-{fmt}-recv")
            v1push = None
            if transfer:
                # The receiver gets v1 the realistic way: pushed from the sender into an empty store.
                wh.init(recv)
                p1 = wh.push(base, "v1", recv)
                v1push = {"bytes": p1["report"]["wire_bytes_out"] + p1["report"]["wire_bytes_in"],
                          "payload_bytes": p1["report"]["payload_bytes"], "secs": p1["secs"], "cpu": p1["cpu"],
                          "rss_kb": p1["rss_kb"], "receiver_bytes": tree_bytes(recv)}
                log(f"wharf {fmt}: push v1 into an empty receiver: {v1push['bytes'] / 1e6:.1f} MB, {p1['secs']:.1f} s")
            for s in ss:
                v2 = pairs[(fmt, s)][1]
                st = os.path.join(work, f"w-{fmt}-{s}")
                rm(st)
                shutil.copytree(base, st)  # = a fresh store that has added v1 only
                log(f"wharf {fmt}/{s}: add v2 ({v2['file']}), extract, compare")
                warm(v2["path"])
                a2 = wh.add(st, v2["path"], "v2")
                out = os.path.join(work, "out.tar")
                rm(out)
                warm()
                ex = wh.extract(st, "v2", out)
                sha = sha256_file(out)
                rm(out)
                tr = None
                if transfer:
                    log(f"wharf {fmt}/{s}: transfer to a receiver holding v1")
                    tr = bench_transfer(wh, st, recv, v2, work)
                rm(st)
                rep = a2["report"]
                res.append({
                    "format": fmt, "scenario": s, "v1": v1["file"], "v2": v2["file"], "v2_size": v2["size"],
                    "v1_add": {k: a1[k] for k in ("secs", "cpu", "rss_kb", "store_growth")} | {
                        "stored_bytes": a1["report"]["stored_bytes"], "new_bytes": a1["report"]["new_bytes"]},
                    "new_bytes": rep["new_bytes"], "stored_bytes": rep["stored_bytes"],
                    "store_growth": a2["store_growth"], "chunks": rep["chunks"], "new_chunks": rep["new_chunks"],
                    "add_secs": a2["secs"], "add_cpu": a2["cpu"], "add_rss_kb": a2["rss_kb"],
                    "extract_secs": ex["secs"], "extract_rss_kb": ex["rss_kb"],
                    "identical": sha == v2["sha256"] and rep["sha256"] == v2["sha256"],
                } | ({"transfer": tr, "v1_push": v1push} if tr else {}))
            rm(base)
            rm(recv)
    return res


def bench_throughput(wh, tools, img, work, reps):
    """Throughput on one image, each figure beside the limit measured on the same data."""
    size = img["size"]
    path = img["path"]
    mb = size / 1e6
    rows = {}
    cmds = {}
    log(f"throughput on {img['file']} ({mb:.0f} MB), {reps} repetitions each")
    measure(["cat", path])  # warm the page cache

    def rep(key, fn, label):
        runs = []
        for _ in range(reps):
            runs.append(fn())
        secs = median([r["secs"] for r in runs])
        rows[key] = {"label": label, "secs": secs, "MBps": mb / secs, "all_secs": [r["secs"] for r in runs],
                     "cpu": median([r["cpu"] for r in runs]), "rss_kb": max(r["rss_kb"] for r in runs),
                     "cmd": runs[-1]["cmd"]}
        log(f"  {label}: {mb / secs:.0f} MB/s ({secs:.2f} s)")

    # limits; compression at the level wharf uses by default
    store = os.path.join(work, "tp-store")
    zlevel = f"-{wh.init(store)['zstd_level']}"
    rm(store)
    rep("cat", lambda: measure(["cat", path]), "cat (page cache read)")
    zst = os.path.join(work, "img.tar.zst")
    if tools.have("zstd"):
        rep("zstd_c", lambda: measure(["zstd", "-q", "-T2", zlevel, "-c", path]), f"zstd -T2 {zlevel} compress")
        measure(["zstd", "-q", "-f", "-T2", zlevel, path, "-o", zst])
        rep("zstd_d", lambda: measure(["zstd", "-q", "-d", "-c", zst]), "zstd -d decompress")
        rows["zstd_d"]["note"] = f"output MB/s (input {os.path.getsize(zst) / 1e6:.0f} MB .zst)"
    if tools.have("openssl"):
        rep("sha256", lambda: measure(["openssl", "dgst", "-sha256", path]), "openssl dgst -sha256")
    if tools.have("b3sum"):
        rep("b3sum", lambda: measure(["b3sum", path]), "b3sum (all cores)")
        rep("b3sum1", lambda: measure(["b3sum", "--num-threads", "1", path]), "b3sum --num-threads 1")
    rm(zst)
    # wharf
    level = {}

    def add_new():
        cfg = wh.init(store)
        level["zstd"] = cfg["zstd_level"]
        level["avg"] = cfg["chunking"]["avg"]
        return wh.add(store, path, "a")
    rep("add_new", add_new, "wharf add, new data")
    n = iter(range(1000))
    rep("add_stored", lambda: wh.add(store, path, f"again-{next(n)}"), "wharf add, already stored (same tar, new name)")
    rep("extract_null", lambda: wh.extract(store, "a", "-"), "wharf extract -o - > /dev/null")
    out = os.path.join(work, "tp-out.tar")

    def ex_file():
        rm(out)
        return wh.extract(store, "a", out)
    rep("extract_file", ex_file, "wharf extract -o FILE (same disk)")
    ok = sha256_file(out) == img["sha256"]
    rm(out)
    rm(store)
    return {"image": img["file"], "size": size, "reps": reps, "zstd_level": level.get("zstd"),
            "avg_chunk": level.get("avg"), "rows": rows, "extract_identical": ok, "cmds": cmds}


def bench_gzip_throughput(wh, tools, img, work):
    """One add and one extract of an image with gzip layers, beside gzip itself on the same layer blobs.

    One run each (they are slow); the limits are summed over the image's layer blobs."""
    log(f"gzip-image throughput on {img['file']} ({img['size'] / 1e6:.0f} MB), 1 run each")
    rows = {}
    size = img["size"]
    plain_total = sum(l.get("uncompressed_size", 0) for l in img["layers"])
    measure(["cat", img["path"]])
    if tools.have("gzip"):
        d = fresh_dir(os.path.join(work, "gz-limits"))
        with tarfile.open(img["path"], "r:") as t:
            members = json.load(t.extractfile("manifest.json"))[0]["Layers"]
            blobs = []
            for i, m in enumerate(members):
                p = os.path.join(d, f"{i}.gz")
                with open(p, "wb") as o:
                    shutil.copyfileobj(t.extractfile(m), o, 4 << 20)
                blobs.append(p)
        dec, comp = [], []
        for p in blobs:
            dec.append(measure(["gzip", "-d", "-c", p], stdout=p[:-3]))
            comp.append(measure(["gzip", "-6", "-n", "-c", p[:-3]]))
        plain = sum(os.path.getsize(p[:-3]) for p in blobs)
        for key, runs, label in (("gz_d", dec, "gzip -d of the layer blobs"),
                                 ("gz_c", comp, "gzip -6 -n of their plaintext (one core)")):
            secs = sum(r["secs"] for r in runs)
            rows[key] = {"label": label, "secs": secs, "MBps": size / 1e6 / secs, "cpu": sum(r["cpu"] for r in runs),
                         "rss_kb": max(r["rss_kb"] for r in runs), "cmd": runs[-1]["cmd"].replace(d, "DIR")}
        plain_total = plain
        rm(d)
    store = os.path.join(work, "gz-store")
    wh.init(store)
    r = wh.add(store, img["path"], "a")
    rows["add_new"] = {"label": "wharf add, new data", "secs": r["secs"], "MBps": size / 1e6 / r["secs"],
                       "cpu": r["cpu"], "rss_kb": r["rss_kb"], "cmd": r["cmd"],
                       "stored": r["report"]["stored_bytes"]}
    r = wh.extract(store, "a", "-")
    rows["extract_null"] = {"label": "wharf extract -o - > /dev/null", "secs": r["secs"],
                            "MBps": size / 1e6 / r["secs"], "cpu": r["cpu"], "rss_kb": r["rss_kb"], "cmd": r["cmd"]}
    for k, v in rows.items():
        log(f"  {v['label']}: {v['MBps']:.1f} MB/s ({v['secs']:.1f} s)")
    rm(store)
    return {"image": img["file"], "size": size, "plain": plain_total, "rows": rows}


# ---------------------------------------------------------------- scale: one multi-GB image

SCALE_GEN = 1            # bump when scale_image's output changes: a cached image is then rebuilt
SCALE_RSS_MB = 200       # target: peak RSS of add / extract / push whatever the image size
SCALE_PUSH_MBPS = 500    # target: a push of all-new data over loopback, MB/s of chunk payload
SCALE_NOOP_S = 2.0       # target: a no-op push of a multi-GB image, wall seconds
SCALE_WIRE_PCT = 1.0     # target: wire bytes of the all-new push within this % of its payload
SCALE_REPO = "wharf-bench/scale"


def scale_copies(src_size, gb):
    return max(1, min(255, round(gb * 1e9 / src_size)))


def scale_image(src, copies, cache_dir):
    """A deterministic multi-GB image in the legacy `docker save` layout, cached in cache_dir.

    Its layers are `copies` copies of each layer tar of src (a corpus image with uncompressed layers, listed
    by its manifest.json): in copy c (c = 1..copies) every regular file's content is XORed byte-wise with
    c, while every other byte of the layer tar (headers, padding, the end blocks) is kept, so names, modes,
    mtimes and sizes stay as they were. XOR with a constant keeps the data as compressible as it was but
    changes every chunk, so no copy dedups against another. Around the layers: `<v1id>/{VERSION,json,
    layer.tar}` per layer, the image config (the source's, with the new diff_ids and one history entry per
    layer), manifest.json and repositories, in name order (as Docker <= 24 writes them). The same source
    and copies give the same bytes every time; the image is kept across runs under a name holding those
    parameters (and SCALE_GEN), and other scale images in cache_dir are deleted."""
    key = f"scale-g{SCALE_GEN}-{src['sha256'][:16]}-x{copies}"
    path = os.path.join(cache_dir, key + ".tar")
    meta_path = path + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if os.path.getsize(path) == meta.get("size"):
            log(f"scale image: reusing {path} ({meta['size'] / 1e9:.2f} GB)")
            return meta | {"path": path, "cached": True, "build_secs": None}
    os.makedirs(cache_dir, exist_ok=True)
    for f in os.listdir(cache_dir):
        if f.startswith("scale-"):
            rm(os.path.join(cache_dir, f))
    t0 = time.perf_counter()
    log(f"scale image: building {path}: {copies} copies of the layers of {src['file']}")
    with open(src["path"], "rb") as f:
        outer = tarfile.open(fileobj=f)
        mem = {m.name: m for m in outer.getmembers()}
        man = json.load(outer.extractfile("manifest.json"))[0]
        cfg = json.load(outer.extractfile(man["Config"]))
        layers = []
        for name in man["Layers"]:
            m = mem[name]
            f.seek(m.offset_data)
            raw = f.read(m.size)
            regions = [(x.offset_data, x.offset_data + x.size)
                       for x in tarfile.open(fileobj=io.BytesIO(raw)) if x.isreg() and x.size]
            layers.append((raw, regions))
        mtime = mem[man["Layers"][0]].mtime
    xor = [bytes(b ^ c for b in range(256)) for c in range(256)]

    def pieces(raw, regions, c):
        x = memoryview(raw.translate(xor[c]))
        o = memoryview(raw)
        pos = 0
        for a, b in regions:
            if a > pos:
                yield o[pos:a]
            yield x[a:b]
            pos = b
        if pos < len(raw):
            yield o[pos:]

    order = [(c, i) for c in range(1, copies + 1) for i in range(len(layers))]
    # pass 1: the diff_ids (the ids of the layer directories and the config depend on all of them)
    diff = []
    for c, i in order:
        h = hashlib.sha256()
        for p in pieces(*layers[i], c):
            h.update(p)
        diff.append(h.hexdigest())
    chain, ids, parent = None, [], ""
    jsons = []
    for (c, i), d in zip(order, diff):
        chain = d if chain is None else hashlib.sha256(f"sha256:{chain} sha256:{d}".encode()).hexdigest()
        v1 = hashlib.sha256(f"wharf-bench scale {chain} {parent}".encode()).hexdigest()
        j = {"id": v1} | ({"parent": parent} if parent else {}) | {
            "created": cfg.get("created", "1970-01-01T00:00:00Z"), "container_config": {"Cmd": None},
            "comment": f"copy {c} of layer {i + 1} of {src['file']}", "os": "linux"}
        ids.append(v1)
        jsons.append(json.dumps(j, separators=(",", ":")).encode())
        parent = v1
    hist = []
    for c in range(1, copies + 1):
        for e in cfg.get("history", []):
            e = dict(e)
            if not e.get("empty_layer"):
                e["created_by"] = e.get("created_by", "") + f" # wharf-bench scale copy {c}"
            hist.append(e)
    cfg["history"] = hist
    cfg["rootfs"] = {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff]}
    config = json.dumps(cfg, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [f"{SCALE_REPO}:x{copies}"],
                            "Layers": [f"{v}/layer.tar" for v in ids]}], separators=(",", ":")).encode() + b"\n"
    repos = json.dumps({SCALE_REPO: {f"x{copies}": ids[-1]}}, separators=(",", ":")).encode() + b"\n"
    # name -> (kind, content, mtime); kind: "dir", "data" (bytes) or "layer" (index into order)
    items = {config_name: ("data", config, mtime), "manifest.json": ("data", manifest, 0),
             "repositories": ("data", repos, 0)}
    for n, v in enumerate(ids):
        items[v + "/"] = ("dir", None, mtime)
        items[v + "/VERSION"] = ("data", b"1.0", mtime)
        items[v + "/json"] = ("data", jsons[n], mtime)
        items[v + "/layer.tar"] = ("layer", n, mtime)
    # pass 2: write, hashing as it goes
    h = hashlib.sha256()
    tmp = path + ".tmp"
    size = 0
    with open(tmp, "wb") as out:
        def put(b):
            nonlocal size
            out.write(b)
            h.update(b)
            size += len(b)

        for name in sorted(items):
            kind, content, mt = items[name]
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mt, 0, 0, "", ""
            if kind == "dir":
                ti.type, ti.mode, ti.size = tarfile.DIRTYPE, 0o755, 0
                put(ti.tobuf(format=tarfile.USTAR_FORMAT))
                continue
            ti.mode = 0o644
            if kind == "data":
                ti.size = len(content)
                put(ti.tobuf(format=tarfile.USTAR_FORMAT))
                put(content)
            else:
                c, i = order[content]
                ti.size = len(layers[i][0])
                put(ti.tobuf(format=tarfile.USTAR_FORMAT))
                for p in pieces(*layers[i], c):
                    put(p)
            if ti.size % 512:
                put(bytes(512 - ti.size % 512))
        put(bytes(1024))
        out.flush()
        os.fsync(out.fileno())  # no writeback of this image during the timed runs
    os.replace(tmp, path)
    meta = {"file": os.path.basename(path), "size": size, "sha256": h.hexdigest(), "copies": copies,
            "layers": len(order), "source": src["file"], "source_size": src["size"],
            "source_layers": len(layers), "generator": SCALE_GEN}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    secs = time.perf_counter() - t0
    log(f"scale image: {size / 1e9:.2f} GB, {len(order)} layers, built in {secs:.0f} s")
    return meta | {"path": path, "cached": False, "build_secs": secs}


def scale_image_in_child(src, copies, cache_dir):
    """scale_image in a child process. In this one, its buffers (the source's layers, about 0.5 GB) would raise
    the peak RSS of this process, and every child started afterwards reports at least that peak as its own
    ru_maxrss (Python starts children with vfork, and exec keeps the high-water mark of the memory it replaces):
    the peak RSS figures would then be the harness's, not wharf's."""
    code = ("import json, sys, time; sys.path.insert(0, sys.argv[1]); import run; "
            "run.T0 = time.monotonic() - float(sys.argv[2]); "  # the log's clock goes on from this process's
            "print(json.dumps(run.scale_image(json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))")
    p = subprocess.run([sys.executable, "-c", code, HERE, str(time.monotonic() - T0), json.dumps(src), str(copies),
                        cache_dir], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise Failed(f"building the scale image failed (exit {p.returncode}; its error is in the log above)")
    return json.loads(p.stdout)


SCALE_REPORT_KEYS = PUSH_KEYS + ("image_bytes", "new_bytes", "stored_bytes", "chunks", "new_chunks", "layers")


def bench_scale(wh, src, work, reps, gb, cache_dir):
    """add, extract, push and pull of one multi-GB image (scale_image), each with its peak RSS.

    Stores (in work): S (the image added), D (an empty store the all-new push goes into, made afresh for
    each run; the no-op pushes then go into the last one), P (an empty store the pull goes into, afresh each
    run). The add of new data and the extract to a file run once; the rest `reps` times (the no-op pushes at
    least 3 times), the median reported. Every timed run starts after a sync, so the writeback of an earlier
    step's files does not land in it."""
    disk = DiskPeak(work)
    t0 = time.monotonic()
    res = {"gb_requested": gb, "reps": reps, "noop_reps": max(reps, 3), "cache_dir": cache_dir, "rows": {}}
    rows = res["rows"]
    S, D, P = (os.path.join(work, x) for x in ("scale-src", "scale-dest", "scale-pull"))
    out = os.path.join(work, "scale-out.tar")
    try:
        img = scale_image_in_child(src, scale_copies(src["size"], gb), cache_dir)
        res["image"] = img
        # every wharf command through RSS_HELPER: peak RSS of wharf, not at least this harness's; what the
        # helper itself leaves as the smallest figure it can report (`true`), and what it would be without
        wh = Wharf(wh.exe, exact=True)
        res["floor_rss_kb"] = measure(["true"], exact=True)["rss_kb"]
        res["harness_floor_rss_kb"] = measure(["true"])["rss_kb"]
        path, size = img["path"], img["size"]
        log(f"scale: {img['file']} ({size / 1e6:.0f} MB, {img['layers']} layers); {reps} runs of the cheap "
            "figures")
        measure(["cat", path])  # warm the page cache

        def timed(key, short, label, fn, n, prep=None, rate="tar"):
            runs = []
            for _ in range(n):
                if prep:
                    prep()
                os.sync()
                runs.append(fn())
            secs = median([r["secs"] for r in runs])
            r = {"label": label, "short": short, "cmd": runs[-1]["cmd"], "runs": n, "secs": secs,
                 "all_secs": [x["secs"] for x in runs], "cpu": median([x["cpu"] for x in runs]),
                 "rss_kb": max(x["rss_kb"] for x in runs)}
            rep = runs[-1].get("report")
            if rep:
                r["report"] = {k: rep[k] for k in SCALE_REPORT_KEYS if k in rep}
            if rate == "tar":
                r["MBps"] = size / 1e6 / secs
            elif rate == "payload":
                rates = [x["report"]["payload_bytes"] / 1e6 / max(x["report"]["seconds"], 1e-9) for x in runs]
                r["MBps"] = median(rates)
                r["all_MBps"] = rates
                r["json_secs"] = median([x["report"]["seconds"] for x in runs])
                r["wall_MBps"] = rep["payload_bytes"] / 1e6 / secs
            rows[key] = r
            log(f"  {label}: " + (f"{r['MBps']:.0f} MB/s, " if "MBps" in r else "")
                + f"{secs:.2f} s (runs: {', '.join(f'{x:.2f}' for x in r['all_secs'])}), peak {r['rss_kb'] / 1024:.0f} MB")
            return runs

        wh.init(S)
        a = timed("add_new", "add (new)", "`add` of new data into an empty store", lambda: wh.add(S, path, "big"), 1)
        rows["add_new"]["store_growth"] = a[-1]["store_growth"]
        res["store_bytes"] = tree_bytes(S)
        timed("add_stored", "add (stored)", "`add` of the same tar under a new name (already stored)",
              lambda: wh.add(S, path, "big2"), reps)
        timed("extract_null", "extract -o -", "`extract -o -` to /dev/null", lambda: wh.extract(S, "big", "-"), reps)
        timed("extract_file", "extract -o FILE", "`extract -o FILE` (same disk)", lambda: wh.extract(S, "big", out),
              1, prep=lambda: rm(out))
        res["extract_identical"] = sha256_file(out) == img["sha256"]
        rm(out)
        log(f"  extract -o FILE byte-identical: {res['extract_identical']}")
        timed("push_new", "push (all new)", "`push` of all-new data into an empty local store",
              lambda: wh.push(S, "big", D),
              reps, prep=lambda: wh.init(D), rate="payload")
        rep = rows["push_new"]["report"]
        wire = rep["wire_bytes_out"] + rep["wire_bytes_in"]
        res["push_wire_bytes"] = wire
        res["push_wire_over_pct"] = 100 * (wire - rep["payload_bytes"]) / max(rep["payload_bytes"], 1)
        log(f"  all-new push: wire {wire:,} B vs payload {rep['payload_bytes']:,} B "
            f"({res['push_wire_over_pct']:+.2f} %)")
        H = os.path.join(work, "scale-http")

        def push_http():
            """An all-new push to `wharf serve --listen` on an empty store: the sender's peak RSS through
            RSS_HELPER, the server's from its VmHWM before it is stopped; the row shows the larger."""
            wh.init(H)
            tok = os.path.join(work, "scale-token")
            with open(tok, "w") as f:
                f.write("bench-token\n")
            srv = subprocess.Popen([wh.exe, "--quiet", "--store", H, "serve", "--listen", "127.0.0.1:0",
                                    "--push-token-file", tok], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            try:
                got = re.search(r"http://127\.0\.0\.1:\d+", srv.stdout.readline() if srv.stdout else "")
                if not got:
                    raise Failed("wharf serve --listen printed no address")
                r = measure([wh.exe, "--quiet", "--store", S, "push", "big", got.group(0), "--json"],
                            stdout="capture", env={"WHARF_TOKEN": "bench-token"}, exact=True)
                r["report"] = json.loads(r.pop("out"))
                with open(f"/proc/{srv.pid}/status") as f:
                    hwm = re.search(r"VmHWM:\s+(\d+)", f.read())
                r["sender_rss_kb"], r["server_rss_kb"] = r["rss_kb"], int(hwm.group(1)) if hwm else 0
                r["rss_kb"] = max(r["sender_rss_kb"], r["server_rss_kb"])
                return r
            finally:
                srv.terminate()
                srv.wait()
                rm(H)
                rm(tok)

        runs = timed("push_http_new", "push over HTTP (all new)",
                     "`push` of all-new data to `wharf serve --listen` on an empty store (HTTP, loopback)",
                     push_http, reps, rate="payload")
        rows["push_http_new"]["sender_rss_kb"] = max(x["sender_rss_kb"] for x in runs)
        rows["push_http_new"]["server_rss_kb"] = max(x["server_rss_kb"] for x in runs)
        for key, short, label, extra in (
                ("noop_push", "no-op push", "no-op `push` (the receiver holds it): `--as big-again`",
                 ("--as", "big-again")),
                ("noop_push_nodelta", "no-op push --no-deltas", "no-op `push --no-deltas`: `--as big-again-nd`",
                 ("--as", "big-again-nd", "--no-deltas"))):
            runs = timed(key, short, label, lambda: wh.push(S, "big", D, extra), res["noop_reps"], rate=None)
            rows[key]["noop"] = all(x["report"]["chunks_sent"] == 0 and x["report"]["payload_bytes"] == 0
                                    for x in runs)
        rm(D)
        timed("pull_new", "pull (all new)", "`pull` into an empty local store", lambda: wh.pull(P, S, "big"), reps,
              prep=lambda: wh.init(P), rate="payload")
        rm(P)
        rm(S)
        log("scale: delta pushes of images of many chunks")
        res["many_chunks"] = bench_many_chunks(wh, work)
    except (Failed, ValueError, KeyError, OSError) as e:  # a failure must not end the run
        res["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, Failed) else str(e)
        log(f"  scale: FAILED: {res['error'][:300]}")
    finally:
        for x in (S, D, P, out):
            rm(x)
        res["scratch_peak_bytes"] = disk.done()
        res["secs"] = time.monotonic() - t0
    return res


# ---------------------------------------------------------------- many chunks: memory of a delta push

# A delta push's memory that grows with the image grows with its number of chunks, not its bytes: chunk ids
# and list pieces. Two images of seeded random bytes, chunked at 64/256/1024 bytes (the store's config.json
# set so; the CLI's smallest is 1 KiB), give the chunk counts of multi-GB images in seconds, and the slope
# between them is the memory a push needs per chunk.
MANY_CHUNKS_MB = (40, 320)
MANY_CHUNKS_CHANGES = 1000
MANY_CHUNKS_PARAMS = {"min": 64, "avg": 256, "max": 1024}


def many_chunks_pair(d, mb_, changes, seed):
    """v1.tar: one file of `mb_` MiB of random bytes; v2.tar: the same with `changes` 4-byte changes at random
    places. Both the same every run (seeded). Written a MiB at a time: held whole, the image would raise this
    process's peak RSS, and every child started afterwards would report at least that peak as its own (see
    RSS_HELPER), so the peers' and object store's peak MB would be the harness's, not theirs."""
    block = 1 << 20
    rnd = random.Random(seed)
    edits = {}
    for _ in range(changes):
        at = rnd.randrange(mb_ * block)
        at -= max(0, at % block + 4 - block)  # inside one block: a block is written in one piece
        edits.setdefault(at // block, []).append((at % block, rnd.randbytes(4)))
    ti = tarfile.TarInfo("data.bin")
    ti.size, ti.mtime, ti.mode = mb_ * block, 1_700_000_000, 0o644
    paths = []
    for name in ("v1.tar", "v2.tar"):
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(ti.tobuf(format=tarfile.GNU_FORMAT))
            for i in range(mb_):
                data = random.Random(seed * 1_000_003 + i).randbytes(block)
                if name == "v2.tar" and i in edits:
                    data = bytearray(data)
                    for off, b in edits[i]:
                        data[off:off + 4] = b
                f.write(data)
            f.write(bytes(2 * tarfile.BLOCKSIZE))  # the size is a whole number of blocks: no padding before
        paths.append(path)
    return paths


def bench_many_chunks(wh, work):
    """For each size: add v1 and v2 to a tiny-chunk store, push v1 into an empty receiver (no deltas), then push
    v2 into copies of it with and without deltas; peak RSS of the push and its receiving child, and that the
    receiver extracts v2 byte-identical."""
    wh = Wharf(wh.exe, exact=True)
    rows = []
    for size in MANY_CHUNKS_MB:
        d = fresh_dir(os.path.join(work, f"many-{size}"))
        try:
            v1, v2 = many_chunks_pair(d, size, MANY_CHUNKS_CHANGES, seed=size)
            S, R0 = os.path.join(d, "s"), os.path.join(d, "r0")
            wh.init(S)
            cfg_path = os.path.join(S, "config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            cfg["chunking"] = MANY_CHUNKS_PARAMS
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=2)
            wh.add(S, v1, "v1")
            wh.add(S, v2, "v2")
            wh.init(R0)
            first = wh.push(S, "v1", R0, ("--no-deltas",))
            row = {"mb": size, "changes": MANY_CHUNKS_CHANGES, "chunks": first["report"]["chunks_total"]}
            for key, extra in (("deltas", ()), ("no_deltas", ("--no-deltas",))):
                R = os.path.join(d, "r-" + key)
                shutil.copytree(R0, R)
                os.sync()
                r = wh.push(S, "v2", R, extra)
                rep = r["report"]
                out = os.path.join(d, "out.tar")
                wh.extract(R, "v2", out)
                row[key] = {"secs": r["secs"], "cpu": r["cpu"], "rss_kb": r["rss_kb"],
                            "payload_bytes": rep["payload_bytes"], "chunks_sent": rep["chunks_sent"],
                            "delta_chunks": rep.get("delta_chunks", 0),
                            "identical": sha256_file(out) == sha256_file(v2)}
                rm(out)
                rm(R)
            rows.append(row)
            log(f"  many chunks: {size} MiB, {row['chunks']:,} chunks: delta push peak "
                f"{row['deltas']['rss_kb'] / 1024:.0f} MB ({row['deltas']['secs']:.2f} s), without deltas "
                f"{row['no_deltas']['rss_kb'] / 1024:.0f} MB")
        finally:
            rm(d)
    return {"rows": rows, "params": MANY_CHUNKS_PARAMS}


def many_chunks_slope(mc):
    """Bytes of peak RSS per chunk of a delta push, between the smallest and the largest image measured."""
    rows = (mc or {}).get("rows") or []
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    if b["chunks"] <= a["chunks"]:
        return None
    return (b["deltas"]["rss_kb"] - a["deltas"]["rss_kb"]) * 1024 / (b["chunks"] - a["chunks"])


# ---------------------------------------------------------------- object store (Garage)

GARAGE_BUCKET = "wharf"
GARAGE_TIMEOUT = 900          # seconds any one wharf command on the bucket may take before it is killed
S3_KEYS = ("gets", "puts", "lists", "heads", "deletes", "requests", "bytes_down", "bytes_up")


def garage_binary(arg):
    """The garage binary: --garage, else $WHARF_GARAGE_BIN, else `garage` on PATH, else the CI cache."""
    sys.path.insert(0, HERE)
    from garage import GarageCluster  # benches/garage.py
    return arg or GarageCluster.binary()


def build_garage():
    """Builds the garage .ci/run builds, with its script (.ci/garage.sh), into the same cache, so CI and this
    harness build it once between them: 8-11 minutes on 2 cores, before any section is measured. Found
    afterwards by garage_binary(); when the build fails the section is recorded as skipped."""
    from garage import ci_garage
    if not shutil.which("cargo"):
        log("garage: no binary and no cargo to build one")
        return
    log("building garage with .ci/garage.sh (cargo install, as .ci/run does; about 10 minutes on 2 cores, once)")
    if not ci_garage("build"):
        log("garage: .ci/garage.sh build failed (its output above says why)")


def read_s3_stats(path):
    """Sum of the JSON lines wharf processes appended to $WHARF_S3_STATS (one per process that opened
    the bucket); "processes" = how many lines."""
    tot = {k: 0 for k in S3_KEYS}
    n = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                d = json.loads(line)
                n += 1
                for k in S3_KEYS:
                    tot[k] += int(d.get(k, 0))
    tot["processes"] = n
    return tot


def bench_garage(wh, pairs, formats, scenarios, work, gbin, nodelta_formats):
    """wharf with its store in a bucket of fresh 3-node Garage clusters, per pair (see README)."""
    sys.path.insert(0, HERE)
    from garage import GarageCluster, GarageError
    res = {"bin": gbin, "nodes": 3, "bucket": GARAGE_BUCKET, "pairs": [], "nodelta_formats": nodelta_formats,
           "version": GarageCluster(gbin, work).version()}
    for fmt in formats:
        scen = [s for s in scenarios if (fmt, s) in pairs]
        if not scen:
            continue
        v1 = pairs[(fmt, scen[0])][0]
        # Local stores every pair of the format starts from, made (and timed) once: L1 = v1 added, R1 = an
        # empty store into which L1 pushed v1 (the local directory receiver beside the bucket).
        l1, r1 = os.path.join(work, f"g-{fmt}-L1"), os.path.join(work, f"g-{fmt}-R1")
        wh.init(l1)
        a1 = wh.add(l1, v1["path"], "v1")
        local = {"add_v1": {"secs": a1["secs"], "cpu": a1["cpu"], "rss_kb": a1["rss_kb"],
                            "stored_bytes": a1["report"]["stored_bytes"]}}
        wh.init(r1)
        pr = wh.push(l1, "v1", r1)
        local["push_v1"] = {"secs": pr["secs"], "cpu": pr["cpu"], "rss_kb": pr["rss_kb"]} | {
            k: pr["report"].get(k) for k in PUSH_KEYS}
        for i, s in enumerate(scen):
            if pairs[(fmt, s)][0]["file"] != v1["file"]:
                log(f"garage {fmt}/{s}: v1 differs from {v1['file']}: skipped")
                continue
            v2 = pairs[(fmt, s)][1]
            p = {"format": fmt, "scenario": s, "v1": v1["file"], "v2": v2["file"], "v1_size": v1["size"],
                 "v2_size": v2["size"], "local_add_v1": local["add_v1"], "local_push_v1": local["push_v1"],
                 "cluster_start_secs": []}
            clusters = []

            def fresh_cluster(p=p, clusters=clusters):
                """Stops the pair's previous cluster (which removes its data) and starts a fresh one."""
                for c in clusters:
                    c.stop()
                clusters[:] = [GarageCluster(gbin, os.path.join(work, "garage"), GARAGE_BUCKET)]
                clusters[0].start()
                p["cluster_start_secs"].append(round(clusters[0].start_secs, 2))
                return clusters[0]
            try:
                bench_garage_pair(wh, fresh_cluster, p, v1, v2, l1, r1, work, fmt in nodelta_formats,
                                  warm=(i == 0))
            except (Failed, GarageError, ValueError, KeyError, OSError) as e:
                p["error"] = str(e)[:3000] if isinstance(e, (Failed, GarageError)) else f"{type(e).__name__}: {e}"
                log(f"garage {fmt}/{s}: FAILED: {p['error'][:600]}")
            finally:
                for c in clusters:
                    c.stop()
                for d in os.listdir(work):
                    if d.startswith("g-") and d not in (os.path.basename(l1), os.path.basename(r1)):
                        rm(os.path.join(work, d))
            res["pairs"].append(p)
        rm(l1)
        rm(r1)
    return res


def bench_garage_pair(wh, fresh_cluster, p, v1, v2, l1, r1, work, nodeltas, warm):
    """The figures of one pair (README: Object store (Garage)). Each bucket store lives on a cluster of its
    own, started fresh by fresh_cluster() (Garage deduplicates the blocks of identical objects, which would
    make a second copy of the same packs cheaper). nodeltas: also push and pull with --no-deltas, besides
    wharf's default (deltas); warm: also extract a second time with the cache of the first."""
    tag = f"{p['format']}-{p['scenario']}-{os.getpid():x}{int(time.time()) & 0xffff:04x}"
    cache_root = fresh_dir(os.path.join(work, "g-caches"))
    stats = os.path.join(work, "g-stats.jsonl")
    out = os.path.join(work, "g-out.tar")
    exe = wh.exe
    name = f"{p['format']}/{p['scenario']}"
    cl = {}

    def url(kind):
        return f"s3://{GARAGE_BUCKET}/{tag}/{kind}"

    def run(cmd, role, json_out=False, stdout=None):
        """One wharf command with the cluster's credentials, a fresh $WHARF_S3_STATS file and the cache of
        `role` (one directory per machine-role: a fresh one simulates a fresh machine). Also counts the
        requests Garage's node 0 (the endpoint) logged meanwhile, and the nodes' CPU time."""
        c = cl["c"]
        rm(stats)
        env = dict(c.env(), WHARF_S3_STATS=stats, WHARF_CACHE=os.path.join(cache_root, role))
        g0, off = c.cpu_secs(), c.log_offset()
        r = measure(cmd, env=env, stdout="capture" if json_out else stdout, timeout=GARAGE_TIMEOUT)
        r["garage_cpu"] = c.cpu_secs() - g0
        r["s3"] = read_s3_stats(stats)
        time.sleep(0.05)  # the node's last log line
        r["server"] = c.requests_since(off)
        if json_out:
            r["report"] = json.loads(r.pop("out"))
        return r

    def fig(r, **extra):
        f = {"secs": r["secs"], "cpu": r["cpu"], "rss_kb": r["rss_kb"]}
        if "s3" in r:
            f |= {"garage_cpu": round(r["garage_cpu"], 2), "s3": r["s3"], "server": r.get("server")}
        return f | extra

    def xfer_fig(r):
        return fig(r, **{k: r["report"].get(k) for k in PUSH_KEYS})

    def wq(store, *args):
        return [exe, "--quiet", "--store", store, *args]

    def identical(path):
        ok = sha256_file(path) == v2["sha256"]
        rm(path)
        return ok

    def copy(src, dst):
        rm(dst)
        shutil.copytree(src, dst)
        return dst

    variants = [("deltas", [])] + ([("no_deltas", ["--no-deltas"])] if nodeltas else [])
    p["variants"] = [k for k, _ in variants]

    # the local sender: v1 and v2 (the add of v2 timed: the local figure beside the bucket's)
    l12 = copy(l1, os.path.join(work, "g-L12"))
    a = wh.add(l12, v2["path"], "v2")
    p["local_add_v2"] = fig(a, stored_bytes=a["report"]["stored_bytes"], new_bytes=a["report"]["new_bytes"])

    # 1. add v1 then v2 straight into the bucket (one machine, one cache); a cluster of its own
    u = url("add")
    log(f"garage {name}: fresh cluster; add v1, add v2 into {u}")
    cl["c"] = fresh_cluster()
    p["add_init"] = fig(run(wq(u, "init"), "adder"))
    for v, tar in (("v1", v1), ("v2", v2)):
        r = run(wq(u, "add", tar["path"], "--name", v, "--json"), "adder", True)
        p[f"add_{v}"] = fig(r, stored_bytes=r["report"]["stored_bytes"], new_bytes=r["report"]["new_bytes"])
    log(f"  add v1 {p['add_v1']['secs']:.1f} s ({p['add_v1']['s3']['requests']} requests), "
        f"add v2 {p['add_v2']['secs']:.1f} s ({p['add_v2']['s3']['requests']} requests)")

    # 5 and 2. a bucket store per push variant ("the registry"), each on a fresh cluster: init, v1 pushed into
    # it from L1 (all-new data), then v2 from L12; every push from a fresh machine (fresh cache). Beside each,
    # the same push of v2 into a copy of R1 (a local directory store holding v1). The deltas one stays up for
    # steps 3 and 4, so it goes last.
    p["push_v1"], p["push_v2"], p["local_push_v2"] = {}, {}, {}
    rdirs = {}
    for key, extra in reversed(variants):
        u = url(f"registry-{key}")
        log(f"garage {name}: fresh cluster; push v1 (all new), then push v2"
            f"{' ' + ' '.join(extra) if extra else ''} into {u}")
        cl["c"] = fresh_cluster()
        p.setdefault("reg_init", fig(run(wq(u, "init"), f"init-{key}")))
        p["push_v1"][key] = xfer_fig(run(wq(l1, "push", "v1", u, "--json"), f"push-v1-{key}", True))
        p["push_v2"][key] = xfer_fig(run(wq(l12, "push", "v2", u, "--json", *extra), f"push-v2-{key}", True))
        rdirs[key] = copy(r1, os.path.join(work, f"g-R-{key}"))
        p["local_push_v2"][key] = xfer_fig(wh.push(l12, "v2", rdirs[key], extra))
        log(f"  push v1 {p['push_v1'][key]['secs']:.1f} s ({p['push_v1'][key]['s3']['requests']} requests); "
            f"push v2 {p['push_v2'][key]['secs']:.1f} s ({p['push_v2'][key]['s3']['requests']} requests), "
            f"local {p['local_push_v2'][key]['secs']:.1f} s")
    c = cl["c"]
    reg = f"{tag}/registry-deltas/"
    objs = c.list_objects(reg)
    kinds = {}
    for key, size in objs:
        k = key[len(reg):].split("/")[0]
        kinds.setdefault(k, {"count": 0, "bytes": 0})
        kinds[k]["count"] += 1
        kinds[k]["bytes"] += size
    p["registry_objects"] = {"count": len(objs), "bytes": sum(sz for _, sz in objs), "by_kind": kinds,
                             "local_store_bytes": tree_bytes(rdirs["deltas"])}

    # 3. pull v2 from the bucket store (v1 pushed, v2 pushed with deltas) into a copy of L1, fresh cache
    # (a fresh machine), then rebuild it there and compare; the same from the local directory store
    p["pull_v2"], p["local_pull_v2"] = {}, {}
    lp = os.path.join(work, "g-P")
    for key, extra in variants:
        log(f"garage {name}: pull v2{' ' + ' '.join(extra) if extra else ''} from the bucket, and from a local store")
        copy(l1, lp)
        p["pull_v2"][key] = xfer_fig(run(wq(lp, "pull", url("registry-deltas"), "v2", "--json", *extra),
                                         f"puller-{key}", True))
        wh.extract(lp, "v2", out)
        p["pull_v2"][key]["identical"] = identical(out)
        copy(l1, lp)
        r = measure(wq(lp, "pull", rdirs["deltas"], "v2", "--json", *extra), stdout="capture")
        r["report"] = json.loads(r.pop("out"))
        p["local_pull_v2"][key] = xfer_fig(r)
        log(f"  pull {p['pull_v2'][key]['secs']:.1f} s ({p['pull_v2'][key]['s3']['requests']} requests, "
            f"{p['pull_v2'][key]['s3']['bytes_down'] / 1e6:.1f} MB down), local {p['local_pull_v2'][key]['secs']:.1f} s")
        rm(lp)

    # 4. extract v2 from the bucket store with a fresh cache (and once more with it warm); the local one beside.
    # `-o -`: the cold one's stdout is a file, compared with corpus.json; the others go to /dev/null.
    u = url("registry-deltas")
    log(f"garage {name}: extract v2 from {u}")
    p["extract_v2"] = fig(run(wq(u, "extract", "v2", "-o", "-"), "extractor", stdout=out))
    p["extract_v2"]["identical"] = identical(out)
    if warm:
        p["extract_v2_warm"] = fig(run(wq(u, "extract", "v2", "-o", "-"), "extractor"))
    p["local_extract_v2"] = fig(wh.extract(l12, "v2", "-"))
    log(f"  extract {p['extract_v2']['secs']:.1f} s ({p['extract_v2']['s3']['requests']} requests, "
        f"{p['extract_v2']['s3']['bytes_down'] / 1e6:.1f} MB down)"
        + (f", warm cache {p['extract_v2_warm']['secs']:.1f} s ({p['extract_v2_warm']['s3']['requests']} requests)"
           if warm else "") + f"; local {p['local_extract_v2']['secs']:.1f} s")
    p["garage_data_bytes"] = c.data_bytes()
    for d in [l12, cache_root, stats] + list(rdirs.values()):
        rm(d)


def bench_chunks(wh, pairs, fmt, scenarios, work, reps):
    out = []
    scen = [s for s in scenarios if (fmt, s) in pairs]
    if not scen:
        return out
    v1 = pairs[(fmt, scen[0])][0]
    for kib in CHUNK_KIB:
        base = os.path.join(work, f"c-{kib}")
        log(f"chunk study {kib} KiB: add v1 ({reps}x, into an empty store each time)")
        runs = []
        for _ in range(reps):
            wh.init(base, avg_kib=kib)
            runs.append(wh.add(base, v1["path"], "v1"))
        a1 = runs[-1]
        secs = median([r["secs"] for r in runs])
        cpu = median([r["cpu"] for r in runs])
        row = {"kib": kib, "v1_add_secs": secs, "v1_add_MBps": v1["size"] / 1e6 / secs, "v1_add_cpu": cpu,
               "v1_add_MB_per_cpu_s": v1["size"] / 1e6 / cpu,
               "v1_stored": a1["report"]["stored_bytes"], "v1_growth": a1["store_growth"],
               "v1_chunks": a1["report"]["chunks"], "v1_rss_kb": max(r["rss_kb"] for r in runs), "scen": {}}
        log(f"  {kib} KiB v1: {row['v1_add_MBps']:.0f} MB/s wall, {row['v1_add_MB_per_cpu_s']:.0f} MB per CPU-s")
        for s in scen:
            v2 = pairs[(fmt, s)][1]
            st = os.path.join(work, f"c-{kib}-{s}")
            rm(st)
            shutil.copytree(base, st)
            a2 = wh.add(st, v2["path"], "v2")
            row["scen"][s] = {"new_bytes": a2["report"]["new_bytes"], "stored_bytes": a2["report"]["stored_bytes"],
                              "store_growth": a2["store_growth"], "add_secs": a2["secs"],
                              "add_MBps": v2["size"] / 1e6 / a2["secs"]}
            log(f"  {kib} KiB {s}: {a2['report']['stored_bytes'] / 1e6:.3f} MB stored, {a2['secs']:.2f} s")
            rm(st)
        rm(base)
        out.append(row)
    return out


def recommend_chunk(rows, scenarios):
    """Lowest total v2 store growth among sizes whose v1 add costs at most 25% more CPU than the cheapest.

    CPU seconds, not wall seconds: on a shared machine wall time swings with other jobs."""
    if not rows:
        return None
    tot = {r["kib"]: sum(r["scen"][s]["store_growth"] for s in scenarios if s in r["scen"]) for r in rows}
    cpu = {r["kib"]: r["v1_add_cpu"] for r in rows}
    v1 = {r["kib"]: r["v1_stored"] for r in rows}
    cheapest = min(cpu.values())
    ok = [k for k in tot if cpu[k] <= 1.25 * cheapest]
    best = min(ok, key=lambda k: tot[k])
    smallest = min(tot, key=lambda k: tot[k])
    why = (f"{best} KiB: lowest total v2 store growth ({tot[best] / 1e6:.2f} MB over {len([s for s in scenarios if s in rows[0]['scen']])} "
           f"scenarios) among sizes whose v1 add takes at most 25% more CPU than the cheapest "
           f"({cheapest:.2f} CPU-s); its v1 store is {v1[best] / 1e6:.1f} MB")
    if smallest != best:
        why += (f"; {smallest} KiB would save {(tot[best] - tot[smallest]) / 1e6:.2f} MB more but costs "
                f"{cpu[smallest]:.2f} CPU-s per v1 add ({100 * (cpu[smallest] / cheapest - 1):.0f}% more)")
    others = [k for k in sorted(tot) if k != best]
    why += "; v2 growth vs the pick: " + ", ".join(
        f"{k} KiB {100 * (tot[k] / tot[best] - 1):+.0f}% bytes, {100 * (cpu[k] / cpu[best] - 1):+.0f}% CPU" for k in others)
    return {"kib": best, "why": why, "totals": tot}


# ---------------------------------------------------------------- peers

class LayerGzip:
    """gzip -6 size of a layer (for the registry-reuse row), cached by digest for this run."""

    def __init__(self, work):
        self.work = work
        self.cache = {}

    def manifest(self, tar_path):
        with tarfile.open(tar_path, "r:") as t:
            m = json.load(t.extractfile("manifest.json"))[0]
            cfg = t.getmember(m["Config"]).size
            return m, cfg

    def size(self, tar_path, member, digest):
        if digest in self.cache:
            return self.cache[digest]
        tmp = os.path.join(self.work, "layer.tar")
        gz = os.path.join(self.work, "layer.tar.gz")
        with tarfile.open(tar_path, "r:") as t, open(tmp, "wb") as o:
            shutil.copyfileobj(t.extractfile(member), o, 4 << 20)
        r = measure(["gzip", "-6", "-n", "-c", tmp], stdout=gz)
        v = (os.path.getsize(gz), r["secs"], r["rss_kb"])
        rm(tmp)
        rm(gz)
        self.cache[digest] = v
        return v


class RangeServer:
    """Serves one file over HTTP/1.1 on 127.0.0.1, as any static web server does (GET, HEAD, single byte ranges:
    what bita's reader sends), and counts what crosses the socket: requests, body bytes sent (`body`), header bytes
    sent (`head_out`) and request bytes received (`req_in`). Use as a context manager; `url` is the file's URL."""

    def __init__(self, path):
        self.path, self.size = path, os.path.getsize(path)
        self.stats = {"requests": 0, "body": 0, "head_out": 0, "req_in": 0, "ranges": 0}
        self.lock = threading.Lock()
        srv = self

        class Counting:
            def __init__(self, f, key):
                self.f, self.key = f, key

            def add(self, n):
                with srv.lock:
                    srv.stats[self.key] += n

            def readline(self, *a):
                b = self.f.readline(*a)
                self.add(len(b))
                return b

            def read(self, *a):
                b = self.f.read(*a)
                self.add(len(b))
                return b

            def write(self, b):
                n = self.f.write(b)
                self.add(len(b))
                return n

            def __getattr__(self, name):   # flush, close, closed, ...
                return getattr(self.f, name)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in separate writes: with Nagle's algorithm on, each response waits for the
            # client's delayed ACK (~40 ms; 28 s instead of 4 s for ~800 range requests on legacy/rebuild)
            disable_nagle_algorithm = True

            def setup(self):
                super().setup()
                self.rfile = Counting(self.rfile, "req_in")
                self.wfile = Counting(self.wfile, "head_out")   # body bytes are moved to "body" as they are sent

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.serve(False)

            def do_GET(self):
                self.serve(True)

            def serve(self, body):
                with srv.lock:
                    srv.stats["requests"] += 1
                start, end, code = 0, srv.size - 1, 200
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
                if m and (m.group(1) or m.group(2)):
                    if m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), srv.size - 1) if m.group(2) else srv.size - 1
                    else:   # suffix range: the last N bytes
                        start = max(0, srv.size - int(m.group(2)))
                    if start > end or start >= srv.size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{srv.size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    code = 206
                    with srv.lock:
                        srv.stats["ranges"] += 1
                n = end - start + 1
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{srv.size}")
                self.send_header("Content-Length", str(n))
                self.end_headers()
                if not body:
                    return
                with open(srv.path, "rb") as f:
                    f.seek(start)
                    while n > 0:
                        b = f.read(min(n, 1 << 20))
                        if not b:
                            break
                        self.wfile.f.write(b)
                        with srv.lock:
                            srv.stats["body"] += len(b)
                        n -= len(b)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{os.path.basename(path)}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def bita_header_bytes(cba):
    """Bytes of a bita archive's header as `bita clone` reads it before any chunk: magic and dictionary size (14),
    the protobuf dictionary, chunk data offset (8) and header checksum (64) (bitar's header.rs)."""
    with open(cba, "rb") as f:
        pre = f.read(14)
    if pre[:6] != b"BITA1\0":
        raise Failed(f"{cba}: not a bita archive")
    return 14 + int.from_bytes(pre[6:14], "little") + 8 + 64


def peer_rows(pair, tools, work, cheap_only, zstd19, lg):
    v1, v2 = pair
    p1, p2 = v1["path"], v2["path"]
    rows = []

    def row(tool, fn, cmd_tpl):
        t = time.monotonic()
        try:
            warm(p1, p2)
            r = fn()
            r.setdefault("identical", None)
        except Failed as e:
            r = {"error": str(e)}
        except Exception as e:  # noqa: BLE001  (a peer failing must not end the run)
            r = {"error": f"{type(e).__name__}: {e}"}
        r["tool"] = tool
        r["cmd"] = cmd_tpl
        rows.append(r)
        if "error" in r:
            log(f"    {tool}: not available: {r['error'][:200]}")
        else:
            log(f"    {tool}: {r['bytes'] / 1e6:.3f} MB ({time.monotonic() - t:.0f} s)")

    def need(*cmds):
        for c in cmds:
            if not tools.have(c):
                raise Failed(tools.notes.get(c, f"{c} not available"))

    out = os.path.join(work, "rebuilt.tar")

    def check(path=out):
        ok = sha256_file(path) == v2["sha256"]
        rm(path)
        return ok

    def full():
        need("zstd")
        z = os.path.join(work, "full.zst")
        a = measure(["zstd", "-q", "-f", "-T0", "-3", p2, "-o", z])
        b = measure(["zstd", "-q", "-d", "-f", z, "-o", out])
        n = os.path.getsize(z)
        rm(z)
        return {"bytes": n, "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": check()}
    row("full copy, zstd -3", full, "zstd -T0 -3 V2 -o V2.zst; zstd -d V2.zst -o OUT")

    def registry():
        need("gzip")
        old = {l["digest"] for l in v1["layers"]}
        m, cfg = lg.manifest(p2)
        total, secs, rss, nl = cfg, 0.0, 0, 0
        gz = v2["format"].startswith("oci-gzip")
        for l, member in zip(v2["layers"], m["Layers"]):
            if l["digest"] in old:
                continue
            nl += 1
            if gz:  # the blob already is what a registry stores and sends
                total += l["size"]
            else:
                n, s, r = lg.size(p2, member, l["digest"])
                total += n
                secs += s
                rss = max(rss, r)
        return {"bytes": total, "ingest_secs": secs if not gz else None, "rebuild_secs": None,
                "ingest_rss_kb": rss or None, "rebuild_rss_kb": None, "identical": None,
                "note": f"{nl} of {len(v2['layers'])} layers new"}
    row("registry layer reuse", registry,
        "new layers (digest not in v1): gzip -6 -n size (uncompressed formats) or blob size (gzip formats), + config")

    if cheap_only:
        return rows

    def zpatch(level):
        def fn():
            need("zstd")
            z = os.path.join(work, "patch.zst")
            extra = ["-T0"] if level <= 3 else []
            a = measure(["zstd", "-q", "-f"] + extra + [f"--patch-from={p1}", "--long=31", f"-{level}", p2, "-o", z])
            b = measure(["zstd", "-q", "-d", "-f", f"--patch-from={p1}", "--long=31", z, "-o", out])
            n = os.path.getsize(z)
            rm(z)
            return {"bytes": n, "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                    "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": check()}
        return fn
    row("zstd --patch-from -3", zpatch(3),
        "zstd -T0 --patch-from=V1 --long=31 -3 V2 -o P; zstd -d --patch-from=V1 --long=31 P -o OUT")
    if zstd19:
        row("zstd --patch-from -19", zpatch(19),
            "zstd --patch-from=V1 --long=31 -19 V2 -o P; zstd -d --patch-from=V1 --long=31 P -o OUT")

    def xdelta():
        need("xdelta3")
        d = os.path.join(work, "x.vcdiff")
        win = str(1 << max(26, (max(v1["size"], 1) - 1).bit_length()))  # source window >= V1
        a = measure(["xdelta3", "-e", "-f", "-B", win, "-s", p1, p2, d])
        b = measure(["xdelta3", "-d", "-f", "-B", win, "-s", p1, d, out])
        n = os.path.getsize(d)
        rm(d)
        return {"bytes": n, "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": check(),
                "note": f"-B {int(win) >> 20} MiB"}
    row("xdelta3", xdelta, "xdelta3 -e -B W -s V1 V2 D (W = V1 size rounded up to a power of 2); xdelta3 -d -B W -s V1 D OUT")

    def rsync():
        need("rsync")
        d = fresh_dir(os.path.join(work, "rs-dst"))
        dst = os.path.join(d, "img.tar")
        batch = os.path.join(work, "rs.batch")
        # A copy of V1 (not a hard link, which would touch the corpus file's ctime):
        # --only-write-batch leaves it alone; --read-batch then turns it into V2.
        shutil.copy(p1, dst)
        a = measure(["rsync", "-z", "--no-whole-file", f"--only-write-batch={batch}", p2, dst])
        n = os.path.getsize(batch)
        b = measure(["rsync", f"--read-batch={batch}", dst])
        ok = check(dst)
        for x in (d, batch, batch + ".sh"):
            rm(x)
        return {"bytes": n, "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": ok}
    row("rsync batch", rsync,
        "rsync -z --no-whole-file --only-write-batch=B V2 DST (DST = a copy of V1); rsync --read-batch=B DST")

    def casync():
        need("casync")
        s = fresh_dir(os.path.join(work, "ca-store"))
        i1, i2 = os.path.join(work, "v1.caibx"), os.path.join(work, "v2.caibx")
        measure(["casync", "make", "--compression=zstd", f"--store={s}", i1, p1])
        before = file_sizes(s)
        a = measure(["casync", "make", "--compression=zstd", f"--store={s}", i2, p2])
        after = file_sizes(s)
        n = sum(v for k, v in after.items() if k not in before) + os.path.getsize(i2)
        b = measure(["casync", "extract", f"--store={s}", i2, out])
        ok = check()
        for x in (s, i1, i2):
            rm(x)
        return {"bytes": n, "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": ok,
                "note": "new .cacnk files + v2.caibx"}
    row("casync", casync,
        "casync make --compression=zstd --store=S v1.caibx V1; casync make ... v2.caibx V2 (new chunk files + v2.caibx); casync extract --store=S v2.caibx OUT")

    def borg():
        need("borg")
        r = os.path.join(work, "borg-repo")
        rm(r)
        env = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": os.path.join(work, "borg-base"),
               "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        measure(["borg", "init", "-e", "none", r], env=env)
        measure(["borg", "create", "--noctime", "--compression", "zstd,3", f"{r}::v1", p1], env=env)
        a = measure(["borg", "create", "--noctime", "--json", "--compression", "zstd,3", f"{r}::v2", p2], env=env,
                    stdout="capture")
        st = json.loads(a["out"])["archive"]["stats"]
        b = measure(["borg", "extract", "--stdout", f"{r}::v2"], env=env, stdout=out)
        ok = check()
        rm(r)
        rm(env["BORG_BASE_DIR"])
        return {"bytes": st["deduplicated_size"], "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": ok,
                "note": "deduplicated_size, default chunker (2 MiB avg)"}
    row("borg", borg,
        "borg init -e none R; borg create --noctime --compression zstd,3 R::v1 V1; borg create --noctime --json --compression zstd,3 R::v2 V2 (deduplicated_size); borg extract --stdout R::v2")

    def restic():
        need("restic")
        r = os.path.join(work, "restic-repo")
        tpl = os.path.join(work, "restic-tpl")
        rm(r)
        rm(tpl)
        shutil.copytree(os.path.join(HERE, "restic-template"), tpl)
        env = {"RESTIC_PASSWORD": RESTIC_PASSWORD, "RESTIC_FROM_PASSWORD": RESTIC_PASSWORD,
               "RESTIC_CACHE_DIR": os.path.join(work, "restic-cache")}
        # the template fixes the chunker polynomial, so byte counts repeat run to run
        measure(["restic", "init", "-q", "-r", r, "--from-repo", tpl, "--copy-chunker-params",
                 "--repository-version", "2"], env=env)
        measure(["restic", "-r", r, "backup", "-q", p1], env=env)
        d0 = tree_bytes(r, "data")
        a = measure(["restic", "-r", r, "backup", "--json", p2], env=env, stdout="capture")
        summ = [json.loads(l) for l in a["out"].splitlines() if '"summary"' in l][-1]
        packed = tree_bytes(r, "data") - d0
        b = measure(["restic", "-r", r, "dump", summ["snapshot_id"], p2], env=env, stdout=out)
        ok = check()
        for x in (r, tpl, env["RESTIC_CACHE_DIR"]):
            rm(x)
        return {"bytes": packed, "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": ok,
                "note": f"data/ growth (compressed); data_added {summ['data_added'] / 1e6:.1f} MB uncompressed"}
    row("restic", restic,
        "restic init --from-repo benches/restic-template --copy-chunker-params; restic backup V1; restic backup --json V2 (data/ growth; data_added); restic dump SNAP V2")

    def bita():
        need("bita")
        cba = os.path.join(work, "v2.cba")
        for x in (cba, out):
            rm(x)
        # bita's defaults: RollSum chunker, 64 KiB average chunk (16 KiB min, 16 MiB max), brotli level 6. The
        # archive holds every distinct chunk of V2; the sender needs no V1.
        a = measure(["bita", "compress", "-i", p2, cba], exact=True)
        size, head = os.path.getsize(cba), bita_header_bytes(cba)
        # The receiver fetches the archive over HTTP, as bita is meant to be used, from a static server on the
        # loopback that counts the bytes it sends: the header and dictionary, then the chunks not found in V1.
        with RangeServer(cba) as srv:
            b = measure(["bita", "clone", "--seed", p1, srv.url, out], stdout="capture", exact=True,
                        env={"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
        st = srv.stats
        ok = check()
        rm(cba)
        # bita's own account: "Fetched 53.6 MiB (56191078 bytes) from archive ...", "Used ... (N bytes) bytes from
        # SEED": the chunk bytes it read, which with the header must make what the server sent
        got = re.search(r"Fetched .*?\((\d+) bytes\) from archive", b["out"])
        seed = re.search(r"Used .*?\((\d+) bytes\) bytes from", b["out"])
        chunks = st["body"] - head
        said = "bita's log: no byte count found"
        if got:
            said = (f"bita's log agrees: {int(got.group(1)):,} B of chunks" if int(got.group(1)) == chunks else
                    f"**bita's log says {int(got.group(1)):,} B of chunks, the server sent {chunks:,}**")
        return {"bytes": st["body"], "ingest_secs": a["secs"], "rebuild_secs": b["secs"],
                "ingest_rss_kb": a["rss_kb"], "rebuild_rss_kb": b["rss_kb"], "identical": ok,
                "http_requests": st["requests"], "http_overhead": st["head_out"] + st["req_in"],
                "header_bytes": head, "chunk_bytes": chunks, "archive_bytes": size,
                "logged_chunk_bytes": int(got.group(1)) if got else None,
                "seed_bytes": int(seed.group(1)) if seed else None,
                "note": f"sent over HTTP: header + dictionary {mb(head)} MB, chunks {mb(chunks)} MB in "
                        f"{st['requests']} requests ({said}); HTTP headers both ways, not counted: "
                        f"{st['head_out'] + st['req_in']:,} B; "
                        + (f"{mb(int(seed.group(1)))} MB of v2 found in v1; " if seed else "")
                        + f"archive {mb(size)} MB (brotli -6, 64 KiB avg)"}
    row("bita", bita,
        f"bita {BITA_VERSION} (cargo install bita --locked), defaults: bita compress -i V2 v2.cba; "
        "bita clone --seed V1 http://127.0.0.1:PORT/v2.cba OUT (v2.cba served by a static range server in the "
        "harness; bytes = body bytes it sent)")
    return rows


def bench_peers(pairs, formats, scenarios, peer_formats, tools, work, zstd19):
    res = []
    lg = LayerGzip(work)
    for fmt in formats:
        for s in scenarios:
            if (fmt, s) not in pairs:
                continue
            cheap = fmt not in peer_formats
            log(f"peers {fmt}/{s}{' (cheap rows only)' if cheap else ''}")
            rows = peer_rows(pairs[(fmt, s)], tools, work, cheap, zstd19, lg)
            res.append({"format": fmt, "scenario": s, "v2_size": pairs[(fmt, s)][1]["size"], "rows": rows})
    return res


# ---------------------------------------------------------------- report

def mb(n, unit=1e6):
    if n is None:
        return "–"
    x = n / unit
    if x >= 100:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def sec(x):
    return "–" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def rssmb(*kbs):
    vals = [k for k in kbs if k]
    return " / ".join(f"{k / 1024:.0f}" for k in vals) if vals else "–"


def yes(v):
    return {True: "yes", False: "**NO**", None: "n/a"}[v]


def report(R, out_md, png):
    L = []
    a = L.append
    m = R["machine"]
    a("# wharf benchmark results")
    a("")
    a(f"Generated by `{R['command']}` on {R['started']} in {R['elapsed_min']:.1f} min. "
      "This file is rewritten wholesale by `benches/run.py`; do not edit it by hand. "
      "See `benches/README.md` for what each figure means.")
    a("")
    a(f"**Figures were taken on a shared 2-core VM** ({m.get('nproc')} cores, {m.get('cpu', '?')}, "
      f"{m.get('mem_gib', '?')} GiB RAM, Linux {m.get('kernel')}, Debian {m.get('debian', '?')}). "
      f"Load average (1/5/15 min) at start {fmt_load(R['load_start'])}, at end {fmt_load(R['load_end'])}: "
      "other jobs may have run at the same time, so times are indicative; byte counts are exact and repeat "
      "run to run on the same corpus.")
    a("")
    w = R["wharf"]
    a(f"- wharf: `{w.get('version')}`, git {w.get('git')}"
      + (f" with uncommitted changes in {', '.join(w['dirty'])}" if w.get("dirty") else "")
      + f"; binary {w['path']} (built {w.get('mtime')}, sha256 {w.get('sha256')}…), copied before the run.")
    a(f"- corpus: `{R['corpus']}`, tier {R['tier']}; formats {', '.join(R['formats'])}; "
      f"scenarios {', '.join(R['scenarios'])}.")
    a("- sections run, with their wall time and the share of the machine's CPU that *other* processes used "
      "meanwhile (busy time in /proc/stat minus this run's own): "
      + ", ".join(f"{x} ({other_txt(R, x)})" for x in R["sections"]) + f"; scratch space peak {mb(R.get('work_peak_bytes'), 1e9)} GB "
      f"in `{R.get('work', '?')}` (besides the corpus).")
    a("- tool versions: " + "; ".join(f"{k}: {v}" for k, v in R["tool_versions"].items()) + ".")
    a("- units: MB = 10^6 bytes, MB/s = 10^6 bytes per second; peak MB = peak resident set (ru_maxrss of the "
      "process and its children) in MiB.")
    a("")

    # headline
    if R.get("pairs") or R.get("peers"):
        a("## Headline: MB a receiver holding v1 needs for v2")
        a("")
        pushed = any(p.get("transfer") for p in R.get("pairs", []))
        a((f"*{W_PUSH}* = bytes on the pipe (out + in) of `wharf push v2 RECEIVER` to a store holding v1 (a local "
           "child `wharf serve --stdio`): what crosses the wire; details in *wharf transfer* below. "
           if pushed else "")
          + f"*{W_STORE}* = `stored_bytes` of `wharf add V2` "
          "into a store holding V1 (the chunks a receiver lacks, compressed as stored: no deltas, no protocol). "
          "The peers as defined in README. Lowest per scenario in bold. Chart: [bytes.png](bytes.png).")
        a("")
        for fmt in chart_formats(R):
            tools = headline_tools(R, fmt)
            wt = [t for t in W_HEADLINE if any(bytes_for(R, fmt, s, t) is not None for s in R["scenarios"])]
            scen = [s for s in R["scenarios"] if any(bytes_for(R, fmt, s, t) is not None for t in wt + tools)]
            a(f"Format `{fmt}` (v2 = " + ", ".join(f"{s} {mb(v2size(R, fmt, s))}" for s in scen) + " MB):")
            a("")
            a("| tool | " + " | ".join(scen) + " |")
            a("|---|" + "---:|" * len(scen))
            allt = wt + tools
            for t in allt:
                cells = []
                for s in scen:
                    v = bytes_for(R, fmt, s, t)
                    best = min((bytes_for(R, fmt, s, u) for u in allt if bytes_for(R, fmt, s, u) is not None),
                               default=None)
                    c = mb(v) if v is not None else "n/a"
                    cells.append(f"**{c}**" if v is not None and v == best else c)
                a(f"| {t} | " + " | ".join(cells) + " |")
            a("")
        a("![MB a receiver holding v1 needs for v2](bytes.png)")
        a("")

    # wharf store figures
    if R.get("pairs"):
        a("## wharf store: v1 then v2 in a fresh store")
        a("")
        a("For each format and scenario: `wharf init` (defaults: avg chunk "
          f"{R.get('default_avg_kib', '?')} KiB, zstd -{R.get('default_zstd', '?')}), `wharf add V1 --name v1`, "
          "then `wharf add V2 --name v2 --json` (timed), then `wharf extract v2 -o FILE` (timed; FILE on the same "
          "disk) and the SHA-256 of FILE compared with `corpus.json`. *new raw* = `new_bytes` (uncompressed new "
          "chunk bytes); *stored* = `stored_bytes` (compressed bytes written to packs); *store growth* = growth of "
          "all files in the store (packs + index + ref). The v1 store is built once per format and copied for each "
          "scenario.")
        a("")
        a("| format | scenario | v2 MB | new raw MB | stored MB | store growth MB | % of v2 | chunks (new) | add v2 s | add MB/s | add peak MB | extract s | extract MB/s | extract peak MB | byte-identical |")
        a("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for p in R["pairs"]:
            a(f"| {p['format']} | {p['scenario']} | {mb(p['v2_size'])} | {mb(p['new_bytes'])} | {mb(p['stored_bytes'])} | "
              f"{mb(p['store_growth'])} | {100 * p['stored_bytes'] / p['v2_size']:.3f} | {p['chunks']} ({p['new_chunks']}) | "
              f"{sec(p['add_secs'])} | {p['v2_size'] / 1e6 / p['add_secs']:.0f} | {rssmb(p['add_rss_kb'])} | "
              f"{sec(p['extract_secs'])} | {p['v2_size'] / 1e6 / p['extract_secs']:.0f} | {rssmb(p['extract_rss_kb'])} | {yes(p['identical'])} |")
        a("")
        seen = set()
        a("v1 adds (into an empty store):")
        a("")
        a("| format | v1 MB | stored MB | add s | add MB/s | peak MB |")
        a("|---|---:|---:|---:|---:|---:|")
        for p in R["pairs"]:
            if p["format"] in seen:
                continue
            seen.add(p["format"])
            v = p["v1_add"]
            size = p["v1_size"] if "v1_size" in p else None
            a(f"| {p['format']} | {mb(size)} | {mb(v['stored_bytes'])} | {sec(v['secs'])} | "
              f"{(size / 1e6 / v['secs']) if size else 0:.0f} | {rssmb(v['rss_kb'])} |")
        a("")

    transfer_section(R, a)

    # per scenario/format tables
    if R.get("peers") or R.get("pairs"):
        a("## Per scenario and format: wharf beside the peers")
        a("")
        a("*bytes sent* = what a receiver that already holds v1 needs to rebuild v2 (see README for each tool's "
          "definition); *ingest s* = time to produce it on the sender (wharf store: `add` of v2 into a store "
          "holding v1; wharf push: the whole `push`, sender and receiver, v2 being already in the sender's store; "
          "wharf bundle: writing the bundle); *rebuild s* = time to rebuild the v2 tar on the receiver (wharf: "
          "`extract` in the receiver's store); *peak MB* = peak RSS of ingest / rebuild; "
          "*byte-identical* = SHA-256 of the rebuilt tar equals v2's. Every tool finds v1 and v2 in a warm page "
          "cache: both are read once, and `sync` run, before each tool's row (and before each wharf `add` and "
          "`extract`).")
        a("")
        for fmt in R["formats"]:
            for s in R["scenarios"]:
                rows = table_rows(R, fmt, s)
                if not rows:
                    continue
                size = v2size(R, fmt, s)
                a(f"### {s} / {fmt}")
                a("")
                a("| tool | bytes sent (MB) | % of v2 | ingest s | rebuild s | peak MB | byte-identical | note |")
                a("|---|---:|---:|---:|---:|---:|---|---|")
                for r in rows:
                    if "error" in r:
                        what = "failed" if r["tool"].startswith("wharf") else "not available"
                        a(f"| {r['tool']} | {what} | | | | | | {r['error'][:160].replace('|', '/')} |")
                        continue
                    a(f"| {r['tool']} | {mb(r['bytes'])} | {100 * r['bytes'] / size:.3f} | {sec(r.get('ingest_secs'))} | "
                      f"{sec(r.get('rebuild_secs'))} | {rssmb(r.get('ingest_rss_kb'), r.get('rebuild_rss_kb'))} | "
                      f"{yes(r.get('identical'))} | {r.get('note', '')} |")
                a("")

    targets(R, a)

    # throughput
    tp = R.get("throughput")
    if tp:
        rows = tp["rows"]
        a("## Throughput on one image, beside the limits measured in the same run")
        a("")
        a(f"Image `{tp['image']}` ({mb(tp['size'])} MB), read from a warm page cache. Each figure is the median "
          f"of {tp['reps']} runs (MB/s = image MB / wall seconds). wharf at its defaults: zstd level "
          f"{tp['zstd_level']}, avg chunk {tp['avg_chunk'] // 1024 if tp['avg_chunk'] else '?'} KiB, all cores for "
          "compression. The extract rows both verify as they write; `-o -` goes to /dev/null, `-o FILE` writes a "
          f"file on the same disk (byte-identical: {yes(tp['extract_identical'])}).")
        a("")
        a("| operation | wharf MB/s | wharf s | CPU s | peak MB | limit | limit MB/s | wharf / limit (wall) | wharf / limit (per CPU-s) |")
        a("|---|---:|---:|---:|---:|---|---:|---:|---:|")
        pairs = [("add_new", ["zstd_c", "b3sum1", "sha256"]), ("add_stored", ["b3sum1", "sha256", "cat"]),
                 ("extract_null", ["zstd_d", "sha256", "b3sum1"]), ("extract_file", ["zstd_d", "sha256"])]
        for k, lims in pairs:
            if k not in rows:
                continue
            r = rows[k]
            first = True
            for lk in lims:
                if lk not in rows:
                    continue
                l = rows[lk]
                pre = (f"| {r['label']} | {r['MBps']:.0f} | {sec(r['secs'])} | {sec(r['cpu'])} | {rssmb(r['rss_kb'])} "
                       if first else "| | | | | ")
                a(pre + f"| {l['label']} | {l['MBps']:.0f} | {r['MBps'] / l['MBps']:.2f} | {l['cpu'] / r['cpu']:.2f} |")
                first = False
        a("")
        a("Limits alone:")
        a("")
        a("| limit | MB/s | s | CPU s | MB per CPU-s | peak MB | note |")
        a("|---|---:|---:|---:|---:|---:|---|")
        for k in ("cat", "zstd_c", "zstd_d", "sha256", "b3sum", "b3sum1"):
            if k in rows:
                l = rows[k]
                a(f"| {l['label']} | {l['MBps']:.0f} | {sec(l['secs'])} | {sec(l['cpu'])} | "
                  f"{tp['size'] / 1e6 / max(l['cpu'], 1e-3):.0f} | {rssmb(l['rss_kb'])} | {l.get('note', '')} |")
        a("")

    gt = R.get("gzip_throughput")
    if gt:
        rows = gt["rows"]
        a(f"Image with gzip layers: `{gt['image']}` ({mb(gt['size'])} MB; {mb(gt['plain'])} MB of layer plaintext), "
          "one run each (MB/s = image MB / wall s). wharf stores such layers decompressed and rebuilds the exact "
          "gzip bytes on extract; the limits are GNU gzip on the same layer blobs, summed over the layers.")
        a("")
        a("| operation | wharf MB/s | wharf s | CPU s | peak MB | limit | limit MB/s | wharf / limit (wall) |")
        a("|---|---:|---:|---:|---:|---|---:|---:|")
        for k, lims in (("add_new", ["gz_d"]), ("extract_null", ["gz_c", "gz_d"])):
            if k not in rows:
                continue
            r = rows[k]
            first = True
            for lk in lims or [None]:
                pre = (f"| {r['label']} | {r['MBps']:.1f} | {sec(r['secs'])} | {sec(r['cpu'])} | {rssmb(r['rss_kb'])} "
                       if first else "| | | | | ")
                first = False
                if lk in rows:
                    l = rows[lk]
                    a(pre + f"| {l['label']} | {l['MBps']:.1f} | {r['MBps'] / l['MBps']:.2f} |")
                else:
                    a(pre + "| – | – | – |")
        a("")
        if "add_new" in rows:
            a(f"Its store after that add: {mb(rows['add_new'].get('stored'))} MB of packs, for a "
              f"{mb(gt['size'])} MB image.")
            a("")

    scale_section(R, a)

    go_gzip_section(a)

    garage_section(R, a)

    extrapolation_section(R, a)

    # chunk study
    ch = R.get("chunks")
    if ch:
        scen = [s for s in R["scenarios"] if s in ch[0]["scen"]]
        a(f"## Chunk-size study ({R['chunk_format']} format)")
        a("")
        a("`wharf init --avg-chunk-kib N` (min N/4, max 4N), add v1, then add v2 per scenario in a copy of that "
          "store. Cells: v2 *stored* MB (compressed new chunks) / *store growth* MB (packs + index + ref). "
          "v1 add: median of "
          f"{R.get('reps', '?')} adds of v1 into an empty store; MB per CPU-s (user + system time) is the figure "
          "least disturbed by other jobs on a shared machine.")
        a("")
        a("| avg KiB | " + " | ".join(scen) + " | total v2 growth MB | v1 stored MB | v1 chunks | v1 add MB/s | v1 add CPU s | v1 add MB per CPU-s | v1 add peak MB |")
        a("|---:|" + "---:|" * len(scen) + "---:|---:|---:|---:|---:|---:|---:|")
        for r in ch:
            tot = sum(r["scen"][s]["store_growth"] for s in scen)
            a(f"| {r['kib']} | " + " | ".join(f"{mb(r['scen'][s]['stored_bytes'])} / {mb(r['scen'][s]['store_growth'])}"
                                              for s in scen)
              + f" | {mb(tot)} | {mb(r['v1_stored'])} | {r['v1_chunks']} | {r['v1_add_MBps']:.0f} | "
              f"{sec(r.get('v1_add_cpu'))} | {r.get('v1_add_MB_per_cpu_s', 0):.0f} | {rssmb(r['v1_rss_kb'])} |")
        a("")
        rec = R.get("chunk_recommendation")
        if rec:
            a(f"**Recommendation** (rule: lowest total v2 store growth among sizes whose v1 add needs at most "
              f"25% more CPU than the cheapest): "
              f"{rec['why']}. The current default is {R.get('default_avg_kib', '?')} KiB. No code was changed.")
            a("")

    # commands
    a("## Exact commands")
    a("")
    a(f"V1 / V2 are the corpus tars of a pair, OUT the rebuilt tar, `wharf` the copied release binary "
      f"(`{R['wharf']['path']}`)." + (" Per-pair figures:" if R.get("pairs") or R.get("peers") else ""))
    if R.get("pairs") or R.get("peers"):
        a("")
        a("```")
        a("wharf --quiet --store S init")
        a("wharf --quiet --store S add V1 --name v1 --json")
        a("wharf --quiet --store S add V2 --name v2 --json          # timed: ingest s, peak RSS")
        a("wharf --quiet --store S extract v2 -o OUT                # timed: rebuild s; then sha256(OUT) vs corpus.json")
        if any(p.get("transfer") for p in R.get("pairs", [])):
            a("# transfer: R1 = an empty store into which the sender pushed v1, copied afresh for each receiver")
            a("wharf --quiet --store R1 init; wharf --quiet --store S1 push v1 R1 --json     # S1 = the store holding v1 only")
            a("wharf --quiet --store S push v2 R --json                 # timed; bytes = wire_bytes_out + wire_bytes_in")
            a("wharf --quiet --store S push v2 R --json --no-deltas     # timed; same")
            a("WHARF_SSH=split-ssh taskset -c 0 wharf --quiet --store S push v2 ssh://bench/R --json [--no-deltas]"
              "   # timed; into two more copies of R: split-ssh runs `wharf serve --stdio` here on core 1")
            a("wharf --quiet --store S bundle v2 --have v1 -o F --json  # timed; bytes = size of F")
            a("wharf --quiet --store R unbundle F --json                # timed")
            a("wharf --quiet --store R extract v2 -o OUT                # on each receiver: rebuild s; sha256(OUT) vs corpus.json")
        seen = set()
        for p in R.get("peers", []):
            for r in p["rows"]:
                if r["tool"] not in seen:
                    seen.add(r["tool"])
                    a(f"{r['tool']}: {r['cmd']}")
        a("```")
    if tp:
        a("")
        a("Throughput figures (last run of each):")
        a("")
        a("```")
        for k, r in tp["rows"].items():
            a(f"{r['label']}: {r['cmd']}")
        a("```")
    if gt:
        a("")
        a("gzip-image figures:")
        a("")
        a("```")
        for k, r in gt["rows"].items():
            a(f"{r['label']}: {r['cmd']}")
        a("```")
    if ch:
        a("")
        a("Chunk study: `wharf --quiet --store S init --avg-chunk-kib N`, then the adds as above.")
    if (R.get("garage") or {}).get("pairs"):
        a("")
        a("Object store (Garage), per pair; B = `s3://wharf/PAIR`, each store under it (`B/add`, "
          "`B/registry-deltas`, `B/registry-no_deltas`) on a fresh 3-node cluster of its own; every command that "
          "opens B runs with the cluster's AWS_* variables, `WHARF_S3_STATS=FILE` (a fresh file) and "
          "`WHARF_CACHE=DIR` (one fresh directory per role):")
        a("")
        a("```")
        a("wharf --quiet --store B/add init")
        a("wharf --quiet --store B/add add V1 --name v1 --json           # timed; role adder")
        a("wharf --quiet --store B/add add V2 --name v2 --json           # timed; role adder (same cache)")
        a("wharf --quiet --store B/registry-deltas init")
        a("wharf --quiet --store L1 push v1 B/registry-deltas --json     # timed: push of all-new data; L1 = local store, v1 added")
        a("wharf --quiet --store L12 push v2 B/registry-deltas --json    # timed; L12 = L1 + v2 added")
        a("wharf --quiet --store L12 push v2 R --json                    # timed; R = a local store v1 was pushed into")
        a("# formats with a no-deltas variant: the same into B/registry-no_deltas and a copy of R, with --no-deltas")
        a("wharf --quiet --store P pull B/registry-deltas v2 --json [--no-deltas]   # timed; P = a copy of L1")
        a("wharf --quiet --store P extract v2 -o OUT                     # sha256(OUT) vs corpus.json")
        a("wharf --quiet --store P' pull R v2 --json [--no-deltas]       # timed; P' = a copy of L1")
        a("wharf --quiet --store B/registry-deltas extract v2 -o - > OUT # timed; fresh cache; sha256(OUT) vs corpus.json")
        a("wharf --quiet --store B/registry-deltas extract v2 -o -       # timed; same cache (first scenario of a format)")
        a("wharf --quiet --store L12 extract v2 -o -                     # timed")
        a("```")
    sc = R.get("scale") or {}
    if sc.get("rows"):
        a("")
        a(f"Scale section: BIG = the generated image (`{(sc.get('image') or {}).get('path', '?')}`; built by "
          "`scale_image()` in run.py, size from `--scale-gb`), S, D and P stores in the scratch directory; a `sync` "
          "before every timed command:")
        a("")
        a("```")
        a("wharf --quiet --store S init")
        a("wharf --quiet --store S add BIG --name big --json             # timed, 1 run: new data")
        a("wharf --quiet --store S add BIG --name big2 --json            # timed, --reps runs: already stored")
        a("wharf --quiet --store S extract big -o - > /dev/null          # timed, --reps runs")
        a("wharf --quiet --store S extract big -o OUT                    # timed, 1 run; sha256(OUT) vs BIG's, OUT deleted")
        a("wharf --quiet --store D init                                  # afresh before each run of the next line")
        a("wharf --quiet --store S push big D --json                     # timed, --reps runs: all new; payload_bytes / seconds")
        a("wharf --quiet --store S push big D --as big-again --json      # timed, max(--reps, 3) runs: no-op")
        a("wharf --quiet --store S push big D --as big-again-nd --json --no-deltas   # the same without deltas")
        a("wharf --quiet --store P init                                  # afresh before each run of the next line")
        a("wharf --quiet --store P pull S big --json                     # timed, --reps runs")
        a("```")
        a("")
        a("As run (last run of each):")
        a("")
        a("```")
        for k, r in sc["rows"].items():
            a(f"{r.get('short', k)}: {r['cmd']}")
        a("```")
    if R.get("notes"):
        a("")
        a("## Notes")
        a("")
        for n in R["notes"]:
            a(f"- {n}")
    a("")
    with open(out_md, "w") as f:
        f.write("\n".join(L))
    log(f"wrote {out_md}")
    if png:
        chart(R, png)


CHUNKING_PEERS = ["casync", "borg", "restic", "bita", "rsync batch"]
DELTA_PEERS = ["xdelta3", "zstd --patch-from -3", "zstd --patch-from -19"]
PUSH_TIME_RATIO = 1.5   # issue 7: a push with deltas stays within 1.5x the time of a push without


def time_ratio_cells(d, n):
    """The *ratio* (push with deltas / without, bold past issue 7's target) and *break-even link* (MB/s) cells
    of a push with deltas `d` and one without `n`; "–" for what a failed run leaves unknown."""
    if not d or not n:
        return "–", "–"
    ratio = d["secs"] / max(n["secs"], 1e-6)
    rr = f"{ratio:.1f}x" if ratio <= PUSH_TIME_RATIO else f"**{ratio:.1f}x**"
    if d.get("bytes") is None or n.get("bytes") is None:
        return rr, "–"
    extra = d["secs"] - n["secs"]
    return rr, ("any" if extra <= 0 else f"{(n['bytes'] - d['bytes']) / extra / 1e6:.1f}")


def transfer_section(R, a):
    prs = [p for p in R.get("pairs", []) if p.get("transfer")]
    if not prs:
        return
    a("## wharf transfer: what a receiver holding v1 gets for v2")
    a("")
    a("For each format, the receiver is an empty store into which the sender pushed v1 (`wharf push v1 RECEIVER`). "
      "For each scenario, the sender is the store of the table above (v1 and v2 added) and three copies of that "
      "receiver get v2: `wharf push v2 RECEIVER --json` (deltas: the default, zstd level "
      f"{R.get('delta_level') or '?'}), `wharf push v2 RECEIVER --no-deltas --json`, and `wharf bundle v2 --have v1 -o F` "
      "then `wharf unbundle F` on the receiver. RECEIVER is a local directory: `push` runs `wharf serve --stdio` "
      "there as its child, and *bytes* are the bytes counted on that pipe, both ways (`wire_bytes_out + "
      "wire_bytes_in`: chunks, deltas, recipe, negotiation and framing); a bundle's bytes are its file size. "
      "Each receiver then runs `wharf extract v2 -o FILE` (*rebuild s*) and FILE's SHA-256 is compared with "
      "`corpus.json` (*byte-identical*: push with deltas / without / bundle).")
    a("")
    a("| format | scenario | v2 MB | store: new chunks MB | push, no deltas MB | push, deltas MB | no deltas / deltas | "
      "payload as deltas | chunks as deltas | raw MB as deltas (stored MB they replace) | bundle MB |")
    a("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in prs:
        t = p["transfer"]
        d, n, b = good(t.get("push")), good(t.get("push_nodelta")), good(t.get("bundle"))
        ratio = f"{n['bytes'] / max(d['bytes'], 1):.1f}x" if d and n else "–"
        a(f"| {p['format']} | {p['scenario']} | {mb(p['v2_size'])} | {mb(p['stored_bytes'])} | {mb(n.get('bytes'))} | "
          f"{mb(d.get('bytes'))} | {ratio} | {pct(d.get('delta_bytes'), d.get('payload_bytes'))} | "
          f"{d.get('delta_chunks', '–')} / {d.get('chunks_sent', '–')} | "
          f"{mb(d.get('delta_raw_bytes'))} ({mb(d.get('delta_instead_of'))}) | {mb(b.get('bytes'))} |")
    a("")
    a(f"Times (wall s; one run each). *push s* covers both ends (the sender reads its store and computes deltas, the "
      f"child `serve --stdio` verifies and stores); *ratio* = push with deltas / push without (issue 7's target: at "
      f"most {PUSH_TIME_RATIO}x); *break-even link* = the link speed below which the push with deltas finishes first "
      f"once the bytes have to cross a real link rather than this machine's pipe: (bytes saved) / (extra seconds), "
      f"in MB/s (× 8 for Mbit/s); *peak MB* = peak RSS of `push` and its child, with / without deltas.")
    a("")
    a("| format | scenario | push s, deltas | push s, no deltas | ratio | break-even link MB/s | push peak MB | bundle s | "
      "bundle peak MB | unbundle s | rebuild s (push deltas / no deltas / bundle) | byte-identical |")
    a("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for p in prs:
        t = p["transfer"]
        d, n, b = good(t.get("push")), good(t.get("push_nodelta")), good(t.get("bundle"))
        rr, even = time_ratio_cells(d, n)
        a(f"| {p['format']} | {p['scenario']} | {sec(d.get('secs'))} | {sec(n.get('secs'))} | {rr} | {even} | "
          f"{rssmb(d.get('rss_kb'), n.get('rss_kb'))} | {sec(b.get('secs'))} | {rssmb(b.get('rss_kb'))} | "
          f"{sec(b.get('unbundle_secs'))} | {sec(d.get('rebuild_secs'))} / {sec(n.get('rebuild_secs'))} / "
          f"{sec(b.get('rebuild_secs'))} | {yes(d.get('identical'))} / {yes(n.get('identical'))} / "
          f"{yes(b.get('identical'))} |")
    a("")
    if any(good(p["transfer"].get("push_split")) for p in prs):
        a("The same pushes as between two machines of one core each: the sender pinned to core 0 (`taskset -c 0`) "
          "and the receiver reached as `ssh://bench/RECEIVER` with `$WHARF_SSH` set to a stand-in (`SPLIT_SSH` in "
          "run.py) that runs its `wharf serve --stdio` here on core 1, so the two ends no longer share the cores "
          "(one run each; the receiver rebuilds v2 byte-identically as above, checked again). Deltas are sent in "
          "frames of about 256 content chunks, so the receiver rebuilds one while the sender encodes the next.")
        a("")
        a("| format | scenario | push s, deltas | push s, no deltas | ratio | break-even link MB/s | MB, deltas | "
          "byte-identical |")
        a("|---|---|---:|---:|---:|---:|---:|---|")
        for p in prs:
            t = p["transfer"]
            d, n = good(t.get("push_split")), good(t.get("push_split_nodelta"))
            if not d or not n:
                continue
            rr, even = time_ratio_cells(d, n)
            a(f"| {p['format']} | {p['scenario']} | {sec(d['secs'])} | {sec(n['secs'])} | {rr} | {even} | "
              f"{mb(d['bytes'])} | {yes(d.get('identical'))} / {yes(n.get('identical'))} |")
        a("")
    for p in prs:
        for k, t in p["transfer"].items():
            if "error" in t:
                a(f"- **{p['format']}/{p['scenario']}: {k} failed**: {t['error'][:400]}")
                a("")
    seen = set()
    a("Receivers' v1 (`wharf push v1` into an empty store, no deltas possible):")
    a("")
    a("| format | on the pipe MB | push s | peak MB | receiver store MB |")
    a("|---|---:|---:|---:|---:|")
    for p in prs:
        v = p.get("v1_push")
        if not v or p["format"] in seen:
            continue
        seen.add(p["format"])
        a(f"| {p['format']} | {mb(v['bytes'])} | {sec(v['secs'])} | {rssmb(v['rss_kb'])} | {mb(v['receiver_bytes'])} |")
    a("")


def go_gzip_section(a):
    """gzip layers made by Go's compress/gzip, from benches/results-go-gzip.json (benches/go_gzip.py)."""
    path = os.path.join(HERE, "results-go-gzip.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        G = json.load(f)
    a("## gzip layers made by Go")
    a("")
    a(f"Measured by `{G['command']}` on {G['generated']} ({G['go']}), not by this run: each layer tar of "
      f"`{G['source']}` compressed by Go's `compress/gzip` (what Docker, containerd and BuildKit use) at the "
      "level given, the blobs added to a fresh store as members of one archive, and `wharf info --json` read "
      "back. *recon* = the reconstruction data wharf keeps beside the plaintext to rebuild the exact gzip "
      "bytes; *raw* = stored as the compressed bytes (no dedup with other versions), with preflate's reason. "
      "Extract rebuilt every archive byte-identically where the last column says so.")
    a("")
    a("| Go level | layer MB (gzip) | plaintext MB | stored as | recon bytes | recon / gzip | add s | extract s | byte-identical |")
    a("|---|---:|---:|---|---:|---:|---:|---:|---|")
    for r in G["rows"]:
        for i, l in enumerate(r["layers"]):
            how = l["method"] if l["method"] != "raw" else f"raw ({l.get('reason') or '?'})"
            recon = l.get("recon")
            share = f"{100 * recon / l['compressed']:.2f} %" if recon is not None else "–"
            tail = (f"{r['add_s']:.1f} | {r['extract_s']:.1f} | {yes(r['byte_identical'])}" if i == 0
                    else " | | ")
            a(f"| {r['level'] if i == 0 else ''} | {mb(l['compressed'])} | "
              f"{mb(l['plain']) if l.get('plain') else '–'} | {how} | "
              f"{recon if recon is not None else '–'} | {share} | {tail} |")
    a("")
    a("Times are for the whole archive (all its layers), one run, taken at low priority beside another "
      "benchmark (indicative only). wharf uses preflate-rs 0.7.6 with one fix "
      "(vendor/preflate-rs/WHARF.md): stock 0.7.6 rejects the one-code Huffman trees Go writes; with it, 5 of "
      "these 6 layers fell back to raw. A layer that still falls back with `NoMoreMatchesFound` needs preflate's "
      "hash-chain depth cap (4,096) raised, which ../shared/notes/gzip-layers.md measured as working but slow; "
      "not done.")
    a("")


def garage_section(R, a):
    g = R.get("garage")
    if not g:
        return
    a("## Object store (Garage): wharf with its store in a bucket")
    a("")
    if g.get("skipped"):
        a(f"Not run: skipped: {g['skipped']}.")
        a("")
        return
    prs = g.get("pairs", [])
    nproc = R["machine"].get("nproc", "?")
    a(f"**Loopback, one machine:** every bucket store below lives on a fresh 3-node Garage cluster "
      f"({g.get('version', '?')}; replication factor 3, consistency mode consistent, LMDB metadata, started by "
      f"`benches/garage.py`) on this same VM: its 3 nodes share the {nproc} cores with wharf and write every "
      "object 3 times to the same disk. No network latency or bandwidth limit is involved, so these figures show "
      "wharf's request pattern and its CPU and waiting costs, not what a remote bucket would give: there, every "
      "request adds a round trip and bytes cross a real link.")
    a("")
    a("Per pair: the local stores are L1 (v1 added), L12 (v1 and v2 added) and R (an empty local store into which "
      "L1 pushed v1). On the bucket, each store under a fresh prefix of a fresh cluster (Garage deduplicates "
      "identical blocks, which would make a second copy of the same packs cheaper): (1) `wharf add V1` then "
      "`wharf add V2` straight into an empty bucket store; (5) `wharf push v1` from L1 into an empty bucket store "
      "(all-new data) and (2) then `wharf push v2` from L12 into it, a push to `s3://` running a local "
      "`wharf serve --stdio` against the bucket as its child; (3) `wharf pull` of v2 from that bucket store into "
      "a copy of L1, then the receiver's v2 rebuilt and compared with corpus.json; (4) `wharf extract v2 -o -` "
      "from that bucket store (to a file compared with corpus.json). Each is beside the same operation on local "
      "directory stores (*local s*: add into L1 / L12, push into a copy of R, pull from R, extract from L12 to "
      "/dev/null). Every command that opens the bucket gets a fresh cache directory (`WHARF_CACHE`: a fresh "
      "machine), except the add of v2, which uses the add of v1's (the same machine), and the second, "
      "*warm-cache* extract. *requests* and *MB up / down* come from `WHARF_S3_STATS` (summed over every wharf "
      "process that opened the bucket: for push and pull, the `serve` child); a multipart part counts as a PUT "
      "and a coalesced range read as one GET; *MB down* counts the bytes wharf's reads asked for, so the gaps "
      "(up to 1 MiB) that a coalesced GET also carries are not in it. *per GB* = requests per GB (10^9 bytes) "
      "of the image tar (v1 for the v1 rows, else v2). *MB/s* = tar MB / s for add and extract, payload MB / s "
      "(chunk bytes moved, as `--json` reports them) for push and pull. *pipe MB* = `wire_bytes_out + "
      "wire_bytes_in` of push or pull (bucket / local). *CPU s* = wharf's own (with its child) / the 3 Garage "
      "nodes' meanwhile. One run each.")
    a("")
    for p in prs:
        a(f"### Garage: {p['scenario']} / {p['format']}")
        a("")
        if p.get("error"):
            a(f"**Failed**: {p['error'][:1500]}")
            a("")
            continue
        a(f"v1 {mb(p['v1_size'])} MB, v2 {mb(p['v2_size'])} MB; {len(p.get('cluster_start_secs') or [])} fresh "
          "clusters, started in " + " / ".join(sec(x) for x in p.get("cluster_start_secs") or []) + " s.")
        a("")
        a("| step | bucket s | local s | bucket / local | MB/s (bucket / local) | requests: all (GET / PUT / LIST / HEAD / DELETE) | "
          "per GB | MB up | MB down | pipe MB (bucket / local) | CPU s (wharf / garage) | peak MB | byte-identical |")
        a("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
        for label, f, loc, size, kind in garage_rows(p):
            a(garage_row(label, f, loc, size, kind))
        a("")
        ro = p.get("registry_objects")
        ex = p.get("extract_v2")
        if ro and ex:
            kinds = ", ".join(f"{k} {mb(v['bytes'])} MB in {v['count']}" for k, v in ro["by_kind"].items()
                              if v["bytes"] >= 1e5)
            a(f"The bucket store after v1 and v2: {mb(ro['bytes'])} MB in {ro['count']} objects ({kinds}); the same "
              f"local directory store {mb(ro['local_store_bytes'])} MB. The fresh-cache extract downloaded "
              f"{mb(ex['s3']['bytes_down'])} MB, {pct(ex['s3']['bytes_down'], ro['bytes'])} of it, for a "
              f"{mb(p['v2_size'])} MB tar.")
            a("")
    ok = [p for p in prs if not p.get("error")]
    if not ok:
        return
    a("**Requests per GB and throughput against the local store** (medians over the pairs above, range in brackets):")
    a("")

    def stat(vals, f="{:.0f}"):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        return (f.format(median(vals)) + (f" ({f.format(min(vals))}–{f.format(max(vals))})" if len(vals) > 1 else ""))

    def rpg(key, sub=None, v="v2_size"):
        out = []
        for p in ok:
            f = p.get(key)
            f = f.get(sub) if (sub and f) else f
            if f and f.get("s3"):
                out.append(f["s3"]["requests"] / (p[v] / 1e9))
        return out

    def ratio(key, lkey, sub=None, lsub=None):
        out = []
        for p in ok:
            f, l = p.get(key), p.get(lkey)
            if sub:
                f = (f or {}).get(sub)
            if lsub:
                l = (l or {}).get(lsub)
            if f and l and l.get("secs"):
                out.append(f["secs"] / l["secs"])
        return out

    lines = [
        f"- requests per GB of image: add v1 {stat(rpg('add_v1', v='v1_size'))}, add v2 {stat(rpg('add_v2'))}, "
        f"push v1 (all new) {stat(rpg('push_v1', 'deltas', 'v1_size'))}, push v2 {stat(rpg('push_v2', 'deltas'))}, "
        f"pull v2 {stat(rpg('pull_v2', 'deltas'))}, extract v2 (fresh cache) {stat(rpg('extract_v2'))}"
        + (f", extract again (warm cache) {stat(rpg('extract_v2_warm'))}" if any(p.get('extract_v2_warm') for p in ok)
           else "") + ".",
        f"- time on the bucket / time on the local store: add v1 {stat(ratio('add_v1', 'local_add_v1'), '{:.1f}x')}, "
        f"add v2 {stat(ratio('add_v2', 'local_add_v2'), '{:.1f}x')}, push v1 "
        f"{stat(ratio('push_v1', 'local_push_v1', 'deltas'), '{:.1f}x')}, push v2 "
        f"{stat(ratio('push_v2', 'local_push_v2', 'deltas', 'deltas'), '{:.1f}x')}, pull v2 "
        f"{stat(ratio('pull_v2', 'local_pull_v2', 'deltas', 'deltas'), '{:.1f}x')}, extract v2 "
        f"{stat(ratio('extract_v2', 'local_extract_v2'), '{:.1f}x')}.",
        f"- throughput on the bucket: add v1 {stat([p['v1_size'] / 1e6 / p['add_v1']['secs'] for p in ok])} MB/s of "
        f"tar, push of all-new data {stat([f['payload_bytes'] / 1e6 / f['secs'] for p in ok for f in p['push_v1'].values()])} "
        f"MB/s of payload (local: {stat([p['local_push_v1']['payload_bytes'] / 1e6 / p['local_push_v1']['secs'] for p in ok])}), extract {stat([p['v2_size'] / 1e6 / p['extract_v2']['secs'] for p in ok])} MB/s of tar "
        f"(local: {stat([p['v2_size'] / 1e6 / p['local_extract_v2']['secs'] for p in ok])} MB/s).",
        f"- extract downloads {stat([100 * p['extract_v2']['s3']['bytes_down'] / p['registry_objects']['bytes'] for p in ok], '{:.0f}%')} "
        "of the bucket store's bytes (v1's and v2's packs: v2 shares most chunks with v1).",
    ]
    nd = [p for p in ok if "no_deltas" in (p.get("push_v2") or {})]
    if nd:
        def both(key, fld):
            return "; ".join(f"{p['format']}/{p['scenario']} {mb(p[key]['deltas']['s3'][fld])} vs "
                             f"{mb(p[key]['no_deltas']['s3'][fld])}" for p in nd)
        lines.append(
            "- deltas on the bucket (push and pull with wharf's default, against `--no-deltas`, MB with deltas vs "
            f"without): push v2 MB up {both('push_v2', 'bytes_up')}; push v2 MB down {both('push_v2', 'bytes_down')}; "
            f"pull v2 MB down {both('pull_v2', 'bytes_down')}. The `serve` child that talks to the bucket runs on "
            "the same machine as push or pull, so deltas only shrink the local pipe between the two processes; "
            "what crosses the link to the bucket is whole chunks either way, plus the delta bases read back.")
    same, diff, tot_s, tot_g, creates, dels = 0, [], 0, 0, 0, 0
    for p in ok:
        for label, f, _, _, _ in garage_rows(p):
            srv = (f or {}).get("server")
            if not f or not srv or not f.get("s3"):
                continue
            st = f["s3"]
            tot_s += st["requests"]
            tot_g += srv["requests"]
            creates += srv.get("MP_CREATE", 0)
            # DeleteObjects the stats did not count (wharf counts deletes as it makes them)
            extra_del = max(0, srv.get("DELETE_MULTI", 0) + srv.get("DELETE", 0) - st["deletes"])
            dels += extra_del
            if srv["requests"] - srv.get("MP_CREATE", 0) - extra_del == st["requests"]:
                same += 1
            else:
                diff.append(f"{p['format']}/{p['scenario']} {label}: {st['requests']} counted, {srv['requests']} logged")
    if same or diff:
        lines.append(
            f"- cross-check of the request counts: over the {same + len(diff)} bucket steps of the tables, Garage's "
            f"node 0 (the endpoint) logged {tot_g} requests where `WHARF_S3_STATS` counted {tot_s}. The difference "
            f"is {creates} multipart-upload creations (POST ?uploads: the stats count each part and the completion "
            f"as a PUT, not the creation) and {dels} deletes the stats missed (a DeleteObjects POST per process "
            "that took the store lock: the lock's release, uncounted)"
            + (f"; this accounts for every step but: " + "; ".join(diff[:12]) + ("; …" if len(diff) > 12 else "")
               if diff else f"; this accounts for all of it, step by step") + ".")
    for l in lines:
        a(l)
    a("")


def garage_rows(p):
    """(label, bucket figures, local figures, image size, kind) of one pair's table."""
    rows = [("add v1 (empty store)", p.get("add_v1"), p.get("local_add_v1"), p["v1_size"], "add"),
            ("add v2 (store holding v1)", p.get("add_v2"), p.get("local_add_v2"), p["v2_size"], "add")]
    for key, lab in (("deltas", ""), ("no_deltas", "; again, for the --no-deltas store")):
        if key in (p.get("push_v1") or {}):
            rows.append((f"push v1 into an empty store (all new{lab})", p["push_v1"][key], p.get("local_push_v1"),
                         p["v1_size"], "xfer"))
    for key, lab in (("deltas", " (deltas)"), ("no_deltas", ", --no-deltas")):
        if key in (p.get("push_v2") or {}):
            rows.append((f"push v2 to a store holding v1{lab}", p["push_v2"][key],
                         (p.get("local_push_v2") or {}).get(key), p["v2_size"], "xfer"))
    for key, lab in (("deltas", " (deltas)"), ("no_deltas", ", --no-deltas")):
        if key in (p.get("pull_v2") or {}):
            rows.append((f"pull v2 into a store holding v1{lab}", p["pull_v2"][key],
                         (p.get("local_pull_v2") or {}).get(key), p["v2_size"], "xfer"))
    if p.get("extract_v2"):
        rows.append(("extract v2, fresh cache", p["extract_v2"], p.get("local_extract_v2"), p["v2_size"], "extract"))
    if p.get("extract_v2_warm"):
        rows.append(("extract v2 again, warm cache", p["extract_v2_warm"], p.get("local_extract_v2"), p["v2_size"],
                     "extract"))
    return rows


def garage_row(label, f, loc, size, kind):
    """One row of a pair's table: bucket figures f beside the local ones loc."""
    if not f:
        return f"| {label} | – | | | | | | | | | | | |"
    s3 = f.get("s3") or {}
    ls = (loc or {}).get("secs")

    def rate(x):
        n = (x or {}).get("payload_bytes") if kind == "xfer" else size
        if not x or not x.get("secs") or n is None:
            return "–"
        v = n / 1e6 / x["secs"]
        return f"{v:.0f}" if v >= 10 else f"{v:.2f}"

    def pipe(x):
        return mb(x["wire_bytes_out"] + x["wire_bytes_in"]) if x and x.get("wire_bytes_out") is not None else "–"

    if s3:
        req = (f"{s3['requests']} ({s3['gets']} / {s3['puts']} / {s3['lists']} / {s3['heads']} / "
               f"{s3['deletes']})" + (f" [{s3['processes']} stats lines]" if s3.get("processes") != 1 else ""))
        per_gb, up, down = f"{s3['requests'] / (size / 1e9):.0f}", mb(s3["bytes_up"]), mb(s3["bytes_down"])
    else:
        req = per_gb = up = down = "–"
    cells = [label, sec(f["secs"]), sec(ls), f"{f['secs'] / ls:.1f}x" if ls else "–", f"{rate(f)} / {rate(loc)}",
             req, per_gb, up, down, f"{pipe(f)} / {pipe(loc)}" if kind == "xfer" else "–",
             f"{sec(f.get('cpu'))} / {sec(f.get('garage_cpu'))}", rssmb(f.get("rss_kb")), yes(f.get("identical"))]
    return "| " + " | ".join(cells) + " |"


# Extrapolation (issue 5): a 40 GB image and a store of 50 versions, from this run's figures only.
EXTRAP_BYTES = 40e9          # the image: 40 GB (10^9 bytes)
EXTRAP_VERSIONS = 50         # versions kept in the store
INDEX_ENTRY_BYTES = 48       # spec/FORMAT.md §5.1: one index entry per chunk
INDEX_FIXED_BYTES = 1080     # spec/FORMAT.md §5.1: 1080 + 32·P + 48·N bytes per index file
PUSH_ID_BYTES = 100          # transport/src/send.rs (MAX_BASE_IMAGES): a base image's chunk ids, ~100 bytes a chunk
PUSH_MAX_BASES = 2           # transport/src/send.rs MAX_BASE_IMAGES


def dur(s):
    if s is None:
        return "–"
    if s >= 3600:
        return f"{s:.0f} s ({s / 3600:.1f} h)"
    if s >= 120:
        return f"{s:.0f} s ({s / 60:.1f} min)"
    return sec(s)


def rng(kbs):
    lo, hi = min(kbs) / 1024, max(kbs) / 1024
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"


def extrapolation_section(R, a):
    tp = (R.get("throughput") or {}).get("rows", {})
    fmt = "legacy" if any(p["format"] == "legacy" for p in R.get("pairs", [])) else \
        (R["pairs"][0]["format"] if R.get("pairs") else None)
    prs = [p for p in R.get("pairs", []) if p["format"] == fmt]
    if not prs or "add_new" not in tp or "add_stored" not in tp:
        return
    T, N = EXTRAP_BYTES, EXTRAP_VERSIONS
    tgb = f"{T / 1e9:.0f} GB"
    new_r, st_r = tp["add_new"]["MBps"] * 1e6, tp["add_stored"]["MBps"] * 1e6
    img = R["throughput"]["image"]
    v1 = prs[0]
    v1_size, v1a = v1["v1_size"], v1["v1_add"]
    k1 = T / v1_size
    # chunks per GB: a row of the store table where every layer was chunked (the most chunks per MB);
    # rows with unchanged layers count only the chunks of the layers not confirmed whole
    cr = max(prs, key=lambda p: p["chunks"] / p["v2_size"])
    cpb = cr["chunks"] / cr["v2_size"]
    a(f"## Extrapolation: a {tgb} image and a store of {N} versions")
    a("")
    a(f"Arithmetic only, on figures of this run (nothing here was measured at {tgb}): wharf at its defaults "
      f"(avg chunk {R.get('default_avg_kib', '?')} KiB, zstd -{R.get('default_zstd', '?')}, deltas on, zstd level "
      f"{R.get('delta_level') or '?'}), format `{fmt}` (uncompressed layers; `oci` gives the same figures within 1%). "
      f"Every figure is scaled linearly: k = {tgb} / the measured image's size, and each new version is assumed to "
      f"change the **same share** of the image as the measured v1 -> v2 of its scenario. Limits: one shared 2-core "
      f"machine, images of {mb(v1_size)} MB (about 1/{T / v1_size:.0f} of {tgb}), one run for every per-scenario "
      "figure, and linear scaling, which nothing here checks: at 40 GB the page cache may no longer hold the image "
      "or the store, and the index is hundreds of times larger (see (4)).")
    a("")
    a("Measured inputs (source rows):")
    a("")
    a("| input | value | source |")
    a("|---|---:|---|")
    a(f"| add, new data | {tp['add_new']['MBps']:.0f} MB/s | Throughput: *{tp['add_new']['label']}* (`{img}`, median of "
      f"{R['throughput']['reps']}) |")
    a(f"| add, already-stored data | {tp['add_stored']['MBps']:.0f} MB/s | Throughput: *{tp['add_stored']['label']}* |")
    a(f"| v1 | {mb(v1_size)} MB; add {sec(v1a['secs'])} s; store growth {mb(v1a['store_growth'])} MB | wharf store: "
      f"*v1 adds*, `{fmt}` |")
    if v1.get("v1_push"):
        a(f"| push of v1 to an empty receiver | {mb(v1['v1_push']['bytes'])} MB in {sec(v1['v1_push']['secs'])} s | "
          f"wharf transfer: *Receivers' v1*, `{fmt}` |")
    a(f"| chunks per GB | {cr['chunks']} chunks / {mb(cr['v2_size'], 1e9)} GB = {cpb * 1e9:,.0f} | wharf store: "
      f"`{fmt}/{cr['scenario']}` *chunks* (every layer chunked there; the other rows count only the chunks of layers "
      "not confirmed whole) |")
    a(f"| per scenario: v2 MB, new raw MB, store growth MB, new chunks | see the tables below | wharf store: `{fmt}` rows |")
    a(f"| per scenario: push bytes and seconds, with and without deltas | see (2) | wharf transfer: `{fmt}` rows |")
    a(f"| index entry | {INDEX_ENTRY_BYTES} bytes per chunk; {INDEX_FIXED_BYTES} + 32 per pack per index file | "
      "spec/FORMAT.md §5.1 |")
    a(f"| chunk ids a push with deltas holds per base image | about {PUSH_ID_BYTES} bytes a chunk, at most "
      f"{PUSH_MAX_BASES} base images | transport/src/send.rs (`MAX_BASE_IMAGES`) |")
    a("")

    # (1) add time
    a(f"**(1) Time to add a {tgb} image.** f = new raw / v2 size (share of new bytes). Model: t = {tgb} × "
      f"(f / {tp['add_new']['MBps']:.0f} MB/s + (1 − f) / {tp['add_stored']['MBps']:.0f} MB/s). The already-stored "
      "rate was measured re-adding an identical tar, where whole layers are confirmed at once; unchanged data inside "
      "a *changed* layer has to be chunked and hashed, so the model is a lower bound for scenarios that touch many "
      "layers. The last column scales the measured `add v2` time of the store table "
      "instead (one run, the tar not necessarily in the page cache); take the larger of the two for "
      "planning.")
    a("")
    a(f"| add | f (share new) | model s at {tgb} | measured add s × k | k |")
    a("|---|---:|---:|---:|---:|")
    a(f"| first (v1 into an empty store) | 1 | {dur(T / new_r)} | {dur(v1a['secs'] * k1)} | {k1:.1f} |")
    for p in prs:
        f = p["new_bytes"] / p["v2_size"]
        k = T / p["v2_size"]
        a(f"| new version: {p['scenario']} | {100 * f:.3f}% | {dur(T * (f / new_r + (1 - f) / st_r))} | "
          f"{dur(p['add_secs'] * k)} | {k:.1f} |")
    a("")
    gt = (R.get("gzip_throughput") or {}).get("rows", {})
    if "add_new" in gt:
        g = R["gzip_throughput"]
        a(f"Images with gzip layers are much slower to add: {gt['add_new']['MBps']:.1f} MB/s of image for "
          f"`{g['image']}` ({mb(g['size'])} MB, one run), so a {tgb} image of gzip layers would take "
          f"{dur(T / (gt['add_new']['MBps'] * 1e6))} the first time (it also holds about "
          f"{g['plain'] / g['size']:.1f}× as many bytes of plaintext).")
        a("")

    # (2) push
    tr = [p for p in prs if good((p.get("transfer") or {}).get("push")) and good(p["transfer"].get("push_nodelta"))]
    if tr:
        a(f"**(2) A push of a new version to a receiver holding the previous one.** Bytes at {tgb} = measured bytes × k, "
          "k = 40 GB / v2 size: this holds only if the new version changes the same share of a 40 GB image as of the "
          "small one (a 40 GB image with one changed file would send about what the small one sends). Time: the "
          "measured push seconds per *changed* MB (new raw MB of the store table) are nearly the same across the "
          "scenarios that change real data (the delta search and encoding of the changed chunks is the work), while "
          "seconds per MB of image vary with the change; so time at 40 GB = (s per changed MB) × (new raw MB × k). "
          "Under the same-share assumption this is the measured time × k. app-change changes almost nothing: its time "
          "is fixed overhead (recipe, negotiation), and scaling it by k assumes that overhead grows with the number "
          "of chunks. Link time is not included (bytes / link speed).")
        a("")
        a(f"| scenario | k | push, deltas MB | at {tgb}, MB | push, no deltas MB | at {tgb}, MB | changed MB at {tgb} | "
          f"push s, deltas | s per changed MB | at {tgb}, s | push s, no deltas | at {tgb}, s |")
        a("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        if v1.get("v1_push"):
            vp = v1["v1_push"]
            a(f"| first push (v1 to an empty receiver) | {k1:.1f} | – | – | {mb(vp['bytes'])} | {mb(vp['bytes'] * k1)} | "
              f"{mb(v1_size * k1)} | – | {vp['secs'] / (v1_size / 1e6):.4f} | – | {sec(vp['secs'])} | {dur(vp['secs'] * k1)} |")
        for p in tr:
            d, n = p["transfer"]["push"], p["transfer"]["push_nodelta"]
            k = T / p["v2_size"]
            spm = d["secs"] / (p["new_bytes"] / 1e6)
            a(f"| {p['scenario']} | {k:.1f} | {mb(d['bytes'])} | {mb(d['bytes'] * k)} | {mb(n['bytes'])} | "
              f"{mb(n['bytes'] * k)} | {mb(p['new_bytes'] * k)} | {sec(d['secs'])} | {spm:.4f} | "
              f"{dur(spm * p['new_bytes'] / 1e6 * k)} | {sec(n['secs'])} | {dur(n['secs'] * k)} |")
        a("")

    # (3) store after N versions, (4) index
    v1_store = v1a["store_growth"] * k1
    v1_chunks = cpb * T
    a(f"**(3) Store size after {N} versions** (no prune), each new version being the v1 -> v2 change of one scenario "
      f"(rebuild and dep-bump are the likely ones; all four shown): store = v1 store growth × k1 + {N - 1} × (v2 store "
      f"growth × k), k1 = {tgb} / v1 size = {k1:.1f}. Store growth is packs + index + ref (stored bytes alone are "
      f"{mb(v1a['stored_bytes'])} MB for v1). {N} full copies would be {N * T / 1e9:.0f} GB.")
    a("")
    a(f"**(4) Index size**: entries = chunks of v1 at {tgb} + {N - 1} × new chunks per version × k, with chunks "
      f"of v1 at {tgb} = {cpb * 1e9:,.0f} per GB × {T / 1e9:.0f} = {v1_chunks:,.0f} (an upper bound: chunks repeated "
      f"inside the image get one entry); index bytes = {INDEX_ENTRY_BYTES} × entries, plus {INDEX_FIXED_BYTES} + 32 "
      "per pack per index file (under 0.1 MB for a few hundred packs of 256 MiB, left out). Check on v1: store growth − "
      f"stored = {mb(v1a['store_growth'] - v1a['stored_bytes'])} MB, about {INDEX_ENTRY_BYTES} bytes × "
      f"{(v1a['store_growth'] - v1a['stored_bytes']) / INDEX_ENTRY_BYTES:,.0f} (index and ref), against "
      f"{cpb * v1_size:,.0f} chunks at the rate above.")
    a("")
    a(f"| each new version is | v1 store at {tgb}, GB | growth per version MB | at {tgb}, GB | store after {N} versions, GB | "
      f"÷ one image | ÷ {N} full copies | new chunks per version at {tgb} | index entries after {N} | index MB |")
    a("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in prs:
        k = T / p["v2_size"]
        tot = v1_store + (N - 1) * p["store_growth"] * k
        ent = v1_chunks + (N - 1) * p["new_chunks"] * k
        a(f"| {p['scenario']} | {mb(v1_store, 1e9)} | {mb(p['store_growth'])} | {mb(p['store_growth'] * k, 1e9)} | "
          f"{mb(tot, 1e9)} | {tot / T:.2f} | {100 * tot / (N * T):.1f}% | {p['new_chunks'] * k:,.0f} | {ent:,.0f} | "
          f"{mb(ent * INDEX_ENTRY_BYTES)} |")
    a("")

    # (5) memory
    wk = [p.get(x) for p in prs for x in ("add_rss_kb", "extract_rss_kb")]
    wk += [tp[x]["rss_kb"] for x in ("add_new", "add_stored", "extract_null", "extract_file") if x in tp]
    wk = [x for x in wk if x]
    pk = [p["transfer"]["push"]["rss_kb"] for p in tr if p["transfer"]["push"].get("rss_kb")]
    a(f"**(5) Memory** (MB here = MiB, as *peak MB* above). add and extract: peak {rng(wk)} MB in every `{fmt}` add, "
      f"extract, re-add and throughput run, the same for v1, v2 and every scenario; all were {mb(v1_size)} MB images "
      "(gzip-layer images: up to "
      f"{max([p.get('add_rss_kb') or 0 for p in R['pairs']] + [(p.get('v1_add') or {}).get('rss_kb') or 0 for p in R['pairs']]) / 1024:.0f} MB). "
      "Nothing in these runs shows it growing with the image, but no larger image was measured, so that it stays "
      f"bounded at {tgb} is not shown here; the index (memory-mapped) of (4), some hundreds of MB, counts in RSS as "
      "far as its pages are touched, which was not measured either.")
    slope = many_chunks_slope((R.get("scale") or {}).get("many_chunks"))
    if pk and slope is not None:
        a("")
        grow = slope * (v1_chunks - cpb * v1_size)
        est = max(pk) * 1024 + grow
        a(f"Push with deltas: measured peak {rng(pk)} MB (push and its receiving child) on these {mb(v1_size)} MB images "
          f"({cpb * v1_size:,.0f} chunks). What grows with the image grows with its chunks: {slope:.0f} bytes of peak "
          f"RSS per chunk, measured in *Scale* (*Delta push of images of many chunks*, up to "
          f"{max(r['chunks'] for r in R['scale']['many_chunks']['rows']):,} chunks). Estimate at {tgb} "
          f"({v1_chunks:,.0f} chunks) = largest measured peak + slope × the chunks more = {max(pk) / 1024:.0f} + "
          f"{grow / 2**20:.0f} ≈ **{est / 2**20:.0f} MB** (MiB), assuming the slope stays linear beyond what was "
          "measured.")
    elif pk:
        a("")
        ids_small = cpb * v1_size * PUSH_ID_BYTES
        ids_big = v1_chunks * PUSH_ID_BYTES
        est = max(pk) * 1024 - ids_small + ids_big
        a(f"Push with deltas: measured peak {rng(pk)} MB (push and its receiving "
          f"child). Of that, the base image's chunk ids were only about {ids_small / 2**20:.1f} MB ({cpb * v1_size:,.0f} chunks × "
          f"{PUSH_ID_BYTES} bytes); at {tgb} they are {v1_chunks:,.0f} × {PUSH_ID_BYTES} bytes = {ids_big / 2**20:.0f} MB per "
          f"base image. Estimate = largest measured peak − ids at {mb(v1_size)} MB + ids at {tgb} = "
          f"{max(pk) / 1024:.0f} − {ids_small / 2**20:.0f} + {ids_big / 2**20:.0f} ≈ **{est / 2**20:.0f} MB** (MiB) with one "
          f"base image, about {(est + ids_big * (PUSH_MAX_BASES - 1)) / 2**20:.0f} MB with {PUSH_MAX_BASES}; this assumes "
          "the rest of the push's memory (delta search, buffers, the receiving child) does not grow with the image, which was not measured.")
    a("")


def targets(R, a):
    """The issues' targets, met or missed, stated plainly from this run's figures."""
    rows = []
    tp = (R.get("throughput") or {}).get("rows", {})
    for key, label, want in [("add_stored", "add of already-stored data", 1000),
                             ("extract_null", "extract (to /dev/null)", 1000)]:
        if key in tp:
            got = tp[key]["MBps"]
            rows.append((f"{label} >= {want} MB/s", f"{got:.0f} MB/s", got >= want))
    rss = [p.get(k) for p in R.get("pairs", []) for k in ("add_rss_kb", "extract_rss_kb") if p.get(k)]
    rss += [t.get(k) for p in R.get("pairs", []) for t in (p.get("transfer") or {}).values()
            for k in ("rss_kb", "rebuild_rss_kb", "unbundle_rss_kb") if t.get(k)]
    rss += [r.get("rss_kb") for r in tp.values() if r.get("label", "").startswith("wharf") and r.get("rss_kb")]
    if rss:
        peak = max(rss) / 1024
        rows.append(("peak RSS of wharf < 200 MB (add, extract, push with its child, bundle, unbundle)",
                     f"{peak:.0f} MB", peak < 200))
    full = [f for f in R["formats"] if any(p["format"] == f and len(p["rows"]) > 2 for p in R.get("peers", []))]
    for fmt in full:
        for s in R["scenarios"]:
            w = bytes_for(R, fmt, s, W_STORE)
            if w is None:
                continue
            peers = [(t, bytes_for(R, fmt, s, t)) for t in CHUNKING_PEERS]
            peers = [(t, v) for t, v in peers if v is not None]
            if peers:
                worst = min(peers, key=lambda x: x[1])
                rows.append((f"{fmt}/{s}: wharf store (new chunks) fewer bytes than every chunking peer and rsync",
                             f"wharf store {mb(w)} MB, best of {', '.join(t for t, _ in peers)}: {worst[0]} "
                             f"{mb(worst[1])} MB", w < worst[1]))
            reg = bytes_for(R, fmt, s, "registry layer reuse")
            if s == "rebuild" and reg:
                rows.append((f"{fmt}/rebuild: wharf store (new chunks) >= 10x fewer bytes than registry layer reuse",
                             f"{reg / max(w, 1):.1f}x", reg >= 10 * w))
    # issue 5: "wharf's ingest and rebuild are faster than every chunking peer on the same data"
    speed_peers = [t for t in CHUNKING_PEERS if t != "rsync batch"]
    for fmt in full:
        for s in R["scenarios"]:
            p = pair_for(R, fmt, s)
            if not p:
                continue
            peers = [r for pp in R.get("peers", []) if pp["format"] == fmt and pp["scenario"] == s
                     for r in pp["rows"] if r.get("tool") in speed_peers and "error" not in r]
            for key, wkey, what in [("ingest_secs", "add_secs", "ingest of v2"),
                                    ("rebuild_secs", "extract_secs", "rebuild of v2")]:
                timed = [(r["tool"], r[key]) for r in peers if r.get(key)]
                if not timed or not p.get(wkey):
                    continue
                fastest = min(timed, key=lambda x: x[1])
                rows.append((f"{fmt}/{s}: wharf's {what} faster than every chunking peer "
                             f"({', '.join(t for t, _ in timed)}) (issue 5)",
                             f"wharf {sec(p[wkey])} s; fastest peer {fastest[0]} {sec(fastest[1])} s",
                             p[wkey] < fastest[1]))
    # issue 7: what crosses the wire, with deltas, against every peer (the byte-level deltas included)
    for fmt in full:
        for s in R["scenarios"]:
            w = bytes_for(R, fmt, s, W_PUSH)
            if w is None:
                continue
            peers = [(t, bytes_for(R, fmt, s, t)) for t in headline_tools(R, fmt)]
            peers = [(t, v) for t, v in peers if v is not None]
            if not any(t in DELTA_PEERS for t, _ in peers):
                continue
            best = min(peers, key=lambda x: x[1])
            dl = min(((t, v) for t, v in peers if t in DELTA_PEERS), key=lambda x: x[1])
            got = f"wharf push {w:,} B; best peer {best[0]} {best[1]:,} B (wharf = {w / max(best[1], 1):.2f}x)"
            if dl[0] != best[0]:
                got += f"; best delta tool {dl[0]} {dl[1]:,} B"
            rows.append((f"{fmt}/{s}: push with deltas sends no more bytes than the best peer, "
                         "xdelta3 and zstd --patch-from included (issue 7)", got, w <= best[1]))
    bad, ntr = [], 0
    for p in R.get("pairs", []):
        t = p.get("transfer") or {}
        d, n = good(t.get("push")), good(t.get("push_nodelta"))
        if d and n:
            ratio = d["secs"] / max(n["secs"], 1e-6)
            rows.append((f"{p['format']}/{p['scenario']}: push with deltas <= {PUSH_TIME_RATIO}x the time of a "
                         "push without (issue 7)",
                         f"{sec(d['secs'])} s vs {sec(n['secs'])} s: {ratio:.1f}x", ratio <= PUSH_TIME_RATIO))
        if t:
            ntr += 1
            bad += [f"{p['format']}/{p['scenario']} {k}" + (" (failed)" if "error" in x else "")
                    for k, x in t.items() if not x.get("identical")]
    if ntr:
        rows.append(("every receiver's rebuild byte-identical after push (with and without deltas) and bundle",
                     f"{3 * ntr - len(bad)} of {3 * ntr}" + (f"; differ: {', '.join(bad)}" if bad else ""), not bad))
    gp = (R.get("garage") or {}).get("pairs", [])
    if gp:
        checks, bad, rss = 0, [], []
        for p in gp:
            nm = f"{p['format']}/{p['scenario']}"
            if p.get("error"):
                bad.append(f"{nm} (failed)")
                continue
            figs = [(f"pull {k}", f) for k, f in p.get("pull_v2", {}).items()] + [("extract", p.get("extract_v2"))]
            for what, f in figs:
                checks += 1
                if not (f or {}).get("identical"):
                    bad.append(f"{nm} {what}")
            for f in ([p.get("add_v1"), p.get("add_v2"), p.get("extract_v2"), p.get("extract_v2_warm")]
                      + [x for k in ("push_v1", "push_v2", "pull_v2") for x in (p.get(k) or {}).values()]):
                if f and f.get("rss_kb"):
                    rss.append(f["rss_kb"])
        rows.append(("object store (Garage): every v2 pulled from the bucket (rebuilt on the receiver) and "
                     "extracted from it byte-identical, every pair run",
                     f"{checks - len([b for b in bad if not b.endswith('(failed)')])} of {checks}"
                     + (f"; not: {', '.join(bad)}" if bad else ""), not bad))
        if rss:
            rows.append(("peak RSS of wharf on the object store < 200 MB (add, push and pull with their `serve` "
                         "child, extract)", f"{max(rss) / 1024:.0f} MB", max(rss) / 1024 < 200))
    rows += scale_targets(R)
    if not rows:
        return
    a("## Targets")
    a("")
    a("The targets of the store, benchmark, delta-transfer (7) and scale issues, checked against this run's figures "
      "(times depend on the load noted above; the extract target cannot be met on 2 cores while every layer and "
      "the whole tar are SHA-256-verified: see the note on issue 2). Byte targets are checked on the formats where "
      "every peer ran.")
    a("")
    a("| target | measured | met |")
    a("|---|---|---|")
    for t, got, ok in rows:
        a(f"| {t} | {got} | {'yes' if ok else '**no**'} |")
    a("")


def scale_section(R, a):
    sc = R.get("scale")
    if not sc:
        return
    a("## Scale: one multi-GB image")
    a("")
    if sc.get("skipped"):
        a(f"Not run: skipped: {sc['skipped']}.")
        a("")
        return
    img = sc.get("image")
    rows = sc.get("rows", {})
    if img:
        a(f"A {mb(img['size'], 1e9)} GB image (`{img['file']}`, {img['layers']} layers), built by `benches/run.py` "
          f"from the corpus image `{img['source']}` ({mb(img['source_size'])} MB, {img['source_layers']} layers): "
          f"{img['copies']} cop{'y' if img['copies'] == 1 else 'ies'} of each of its layer tars, where in copy c (1..{img['copies']}) every regular "
          "file's content is XORed byte-wise with c and every other byte (tar headers, padding) is kept. The data "
          "is therefore as compressible as the corpus's but no chunk of one copy recurs in another, so every byte "
          "is new to an empty store. Legacy `docker save` layout (`<id>/layer.tar`, `json`, `VERSION`, config, "
          "`manifest.json`, `repositories`, diff_ids true SHA-256s); the same bytes every run "
          f"(sha256 {img['sha256'][:16]}…), kept in `{sc.get('cache_dir')}` between runs "
          + (f"(built in {img['build_secs']:.0f} s this run)." if img.get("build_secs") else "(reused this run).")
          + " Read from a warm page cache; a `sync` before every timed run.")
        a("")
    if sc.get("error"):
        a(f"**Failed**: {sc['error'][:1500]}")
        a("")
    if not rows:
        return
    nproc = R["machine"].get("nproc", "?")
    a(f"*MB/s* = image MB / wall s for add and extract, chunk payload MB / `seconds` (both from `--json`) for "
      "push and pull (payload = the chunks' bytes as sent, compressed as stored, no protocol). *s* = wall "
      "seconds, the median of the runs (all runs below the table). *peak MB* = peak RSS (ru_maxrss) of wharf "
      "and the child it waited for: for push and pull into a local store that child is the other end, "
      f"`wharf serve --stdio`, so both ends run on the same {nproc} cores and the larger of the two is shown. "
      "Each wharf command is started from a small helper process (`RSS_HELPER` in run.py: `python3 -S -I`), "
      f"whose own size is the smallest peak it can show ({rssmb(sc.get('floor_rss_kb'))} MB, what `true` shows); "
      "started straight from this Python harness, as the other sections' commands are, every figure would be at "
      f"least the harness's own peak ({rssmb(sc.get('harness_floor_rss_kb'))} MB now), because a child inherits "
      "its parent's high-water mark through vfork and exec. "
      "All transfers are between local directory stores over a pipe: loopback, no network.")
    a("")
    a("| operation | runs | MB/s | s | CPU s | peak MB | target | met |")
    a("|---|---:|---:|---:|---:|---:|---|---|")
    rss_t = f"peak < {SCALE_RSS_MB} MB"

    def line(key, target, met, rate=True):
        r = rows.get(key)
        if not r:
            return
        a(f"| {r['label']} | {r['runs']} | " + (f"{r['MBps']:.0f}" if rate and r.get("MBps") else "–")
          + f" | {sec(r['secs'])} | {sec(r['cpu'])} | {rssmb(r['rss_kb'])} | {target} | {met} |")

    def rss_ok(key):
        r = rows.get(key)
        return yes(r["rss_kb"] / 1024 < SCALE_RSS_MB) if r else "n/a"

    for key in ("add_new", "add_stored", "extract_null"):
        line(key, rss_t, rss_ok(key))
    if "extract_file" in rows:
        line("extract_file", rss_t + "; byte-identical", rss_ok("extract_file") + "; byte-identical: "
             + yes(sc.get("extract_identical")))
    pn = rows.get("push_new")
    if pn:
        line("push_new", f">= {SCALE_PUSH_MBPS} MB/s of payload; {rss_t}",
             f"MB/s: {yes(pn['MBps'] >= SCALE_PUSH_MBPS)}; RSS: {rss_ok('push_new')}")
        rep = pn["report"]
        over = sc.get("push_wire_over_pct")
        a(f"| wire bytes of that push (out + in) against its payload | | | | | | within {SCALE_WIRE_PCT:g} %: "
          f"{mb(sc.get('push_wire_bytes'))} MB against {mb(rep['payload_bytes'])} MB, {over:+.2f} % | "
          f"{yes(abs(over) <= SCALE_WIRE_PCT)} |")
    ph = rows.get("push_http_new")
    if ph:
        line("push_http_new", f"{rss_t} (sender {ph['sender_rss_kb'] / 1024:.0f} MB, server "
             f"{ph['server_rss_kb'] / 1024:.0f} MB)", rss_ok("push_http_new"))
    for key in ("noop_push", "noop_push_nodelta"):
        r = rows.get(key)
        if r:
            line(key, f"< {SCALE_NOOP_S:g} s; nothing sent", f"{yes(r['secs'] < SCALE_NOOP_S)}; nothing sent: "
                 f"{yes(r.get('noop'))}", rate=False)
    if "pull_new" in rows:
        line("pull_new", rss_t + " (no throughput target: shown beside the push)", rss_ok("pull_new"))
    a("")
    a("Every run, wall s: " + "; ".join(f"{r.get('short', r['label'])}: " + ", ".join(sec(x) for x in r["all_secs"])
                                         for r in rows.values()) + ".")
    a("")
    an = rows.get("add_new")
    if an:
        ar = an.get("report", {})
        a(f"The store after the add of new data: {mb(sc.get('store_bytes'))} MB for the {mb(img['size'])} MB image "
          f"({pct(sc.get('store_bytes'), img['size'])}; `stored_bytes` {mb(ar.get('stored_bytes'))} MB, "
          f"{ar.get('chunks', '?')} chunks, {ar.get('new_chunks', '?')} new).")
        a("")
    for key in ("push_new", "pull_new"):
        r = rows.get(key)
        if not r:
            continue
        rep = r["report"]
        what = "push" if key == "push_new" else "pull"
        a(f"All-new {what}: {mb(rep['payload_bytes'])} MB of payload in {rep['chunks_sent']} chunks "
          f"(of {rep['chunks_total']}; {rep.get('delta_chunks', 0)} as deltas); `seconds` {sec(r['json_secs'])} "
          f"(median), wall {sec(r['secs'])} s, so {r['wall_MBps']:.0f} MB/s of payload per wall second and "
          f"{rep.get('image_bytes', img['size']) / 1e6 / r['json_secs']:.0f} MB/s of image; wire "
          f"{mb(rep['wire_bytes_out'])} MB out, {mb(rep['wire_bytes_in'])} MB in. CPU: {sec(r['cpu'])} s of both "
          f"ends (median) over {sec(r['secs'])} s wall, {r['cpu'] / (rep['payload_bytes'] / 1e9):.1f} CPU-s per GB of "
          f"payload: even with all {nproc} cores busy the whole time that cost alone allows at most "
          f"{(nproc if isinstance(nproc, int) else 1) * rep['payload_bytes'] / 1e6 / max(r['cpu'], 1e-9):.0f} MB/s "
          "of payload here.")
        a("")
    many_chunks_section(sc.get("many_chunks"), a)
    a(f"Scratch disk: peak {mb(sc.get('scratch_peak_bytes'), 1e9)} GB in the work directory during this section "
      f"(the stores and the extracted file, sampled once a second), besides the {mb(img['size'], 1e9) if img else '?'} "
      "GB image in the cache directory. The section took "
      f"{sc.get('secs', 0) / 60:.1f} min.")
    a("")


def many_chunks_section(mc, a):
    rows = (mc or {}).get("rows") or []
    if not rows:
        return
    prm = mc.get("params") or MANY_CHUNKS_PARAMS
    a("### Delta push of images of many chunks")
    a("")
    a(f"What a push holds that grows with the image grows with its number of chunks (ids, list pieces), not with its "
      f"bytes. Each image here is a tar of one file of seeded random bytes, stored at {prm['min']}/{prm['avg']}/"
      f"{prm['max']}-byte chunks (the store's `config.json` set so: the CLI's smallest average is 1 KiB), so that a few "
      f"hundred MB make as many chunks as a multi-GB image at the default 16 KiB; v2 differs from v1 in "
      f"{rows[0]['changes']} 4-byte changes at random places, which touch most of the file's list pieces. The receiver "
      "holds v1 (pushed to it first, as the sender chunked it); then v2 is pushed into a copy of it with and without "
      "deltas. *peak MB*: of the push and its receiving child (the larger), one run each.")
    a("")
    a("| data MiB | chunks | GB at 16 KiB chunks | push, deltas s | peak MB | payload B | chunks as deltas | "
      "push, no deltas s | peak MB | payload B | byte-identical |")
    a("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        d, n = r["deltas"], r["no_deltas"]
        a(f"| {r['mb']} | {r['chunks']:,} | {r['chunks'] * 16384 / 1e9:.1f} | {sec(d['secs'])} | "
          f"{d['rss_kb'] / 1024:.0f} | {d['payload_bytes']:,} | {d['delta_chunks']} of {d['chunks_sent']} | "
          f"{sec(n['secs'])} | {n['rss_kb'] / 1024:.0f} | {n['payload_bytes']:,} | "
          f"{yes(d['identical'] and n['identical'])} |")
    a("")
    slope = many_chunks_slope(mc)
    if slope is not None:
        lo, hi = rows[0], rows[-1]
        a(f"Slope: ({hi['deltas']['rss_kb'] / 1024:.0f} − {lo['deltas']['rss_kb'] / 1024:.0f} MB) / "
          f"({hi['chunks']:,} − {lo['chunks']:,} chunks) = **{slope:.0f} bytes of peak RSS per chunk** for a push with "
          "deltas (the sender's sorted chunk ids of the image and of its base, 36 and 32 bytes, the planner's lists of "
          "the changed pieces' entries, the index pages it touches); the extrapolation below uses it.")
        a("")


def scale_targets(R):
    """Rows for targets(): the scale issue's four targets, from the scale section's figures."""
    sc = R.get("scale") or {}
    rows = sc.get("rows") or {}
    if not rows:
        return []
    gb = f"{mb(sc['image']['size'], 1e9)} GB" if sc.get("image") else "multi-GB"
    out = []
    nd = [rows[k] for k in ("noop_push", "noop_push_nodelta") if k in rows]
    if nd:
        out.append((f"no-op push of a multi-GB image ({gb}, the receiver holds it) < {SCALE_NOOP_S:g} s",
                    "; ".join(f"{sec(r['secs'])} s {'(--no-deltas)' if 'nodelta' in k else '(deltas, the default)'}"
                              for k, r in rows.items() if k.startswith("noop")) + f", median of {nd[0]['runs']}",
                    all(r["secs"] < SCALE_NOOP_S and r.get("noop") for r in nd)))
    pn = rows.get("push_new")
    if pn:
        out.append((f"push of all-new data ({gb} image, loopback) >= {SCALE_PUSH_MBPS} MB/s of payload",
                    f"{pn['MBps']:.0f} MB/s ({mb(pn['report']['payload_bytes'])} MB in {sec(pn['json_secs'])} s, "
                    f"median of {pn['runs']})", pn["MBps"] >= SCALE_PUSH_MBPS))
        over = sc.get("push_wire_over_pct")
        out.append((f"wire bytes (out + in) of that push within {SCALE_WIRE_PCT:g} % of its payload",
                    f"{over:+.2f} % ({sc['push_wire_bytes']:,} B against {pn['report']['payload_bytes']:,} B)",
                    abs(over) <= SCALE_WIRE_PCT))
    rss = [(r.get("short", k), r["rss_kb"]) for k, r in rows.items() if r.get("rss_kb")]
    if rss:
        top = max(rss, key=lambda x: x[1])
        out.append((f"peak RSS < {SCALE_RSS_MB} MB on the {gb} image (add, extract, push with its child; pull too)",
                    f"{top[1] / 1024:.0f} MB at most ({top[0]}); "
                    + ", ".join(f"{r.get('short', k)} {r['rss_kb'] / 1024:.0f}" for k, r in rows.items()),
                    top[1] / 1024 < SCALE_RSS_MB))
    return out


def other_txt(R, x):
    c = R.get("section_cpu", {}).get(x)
    if not c:
        return f"load {R.get('section_loads', {}).get(x, '?')}"
    return f"{c['wall'] / 60:.1f} min, others {100 * c['other_share']:.0f}%"


def fmt_load(l):
    return "/".join(f"{x:.2f}" for x in l) if l else "?"


def headline_format(R):
    fm = [p["format"] for p in R.get("peers", []) if len(p["rows"]) > 2]
    for f in ("legacy", "oci"):
        if f in fm or any(p["format"] == f for p in R.get("pairs", [])):
            return f
    return (fm or [p["format"] for p in R.get("pairs", [])] or R["formats"])[0]


def chart_formats(R):
    """The formats every peer ran on (at most two), else the headline format."""
    fmts = []
    for f in R["formats"]:
        if any(p["format"] == f and len(p["rows"]) > 2 for p in R.get("peers", [])) and f not in fmts:
            fmts.append(f)
    return fmts[:2] or [headline_format(R)]


def headline_tools(R, fmt):
    out = []
    for p in R.get("peers", []):
        if p["format"] == fmt:
            for r in p["rows"]:
                if r["tool"] not in out:
                    out.append(r["tool"])
    return out


W_PUSH = "wharf push (deltas)"
W_PUSH_ND = "wharf push, no deltas"
W_BUNDLE = "wharf bundle (deltas)"
W_STORE = "wharf store (new chunks)"
W_TRANSFER = {W_PUSH: "push", W_PUSH_ND: "push_nodelta", W_BUNDLE: "bundle"}
# The wharf rows of the headline tables and the chart: what crosses the wire first, then the store figure.
W_HEADLINE = [W_PUSH, W_STORE]


def pair_for(R, fmt, s):
    for p in R.get("pairs", []):
        if p["format"] == fmt and p["scenario"] == s:
            return p
    return None


def transfer_for(R, fmt, s, tool):
    """The figures of one transfer row, or None (not run, or failed: its error is in the per-scenario table)."""
    p = pair_for(R, fmt, s)
    t = ((p or {}).get("transfer") or {}).get(W_TRANSFER[tool])
    return t if t and "error" not in t else None


def good(t):
    return t if t and "error" not in t else {}


def bytes_for(R, fmt, s, tool):
    if tool in (W_STORE, "wharf"):
        p = pair_for(R, fmt, s)
        return p["stored_bytes"] if p else None
    if tool in W_TRANSFER:
        t = transfer_for(R, fmt, s, tool)
        return t["bytes"] if t else None
    for p in R.get("peers", []):
        if p["format"] == fmt and p["scenario"] == s:
            for r in p["rows"]:
                if r["tool"] == tool and "error" not in r:
                    return r["bytes"]
    return None


def v2size(R, fmt, s):
    for p in R.get("pairs", []) + R.get("peers", []):
        if p["format"] == fmt and p["scenario"] == s:
            return p["v2_size"]
    return None


def pct(x, y):
    return "–" if x is None or not y else f"{100 * x / y:.1f}%"


def delta_note(t):
    """"1487 of 1489 chunks as deltas (99.8% of payload)" for a push or bundle report."""
    if t.get("delta_chunks") is None:
        return ""
    return (f"{t['delta_chunks']} of {t['chunks_sent']} chunks sent as deltas "
            f"({pct(t['delta_bytes'], t['payload_bytes'])} of payload)")


def table_rows(R, fmt, s):
    rows = []
    p = pair_for(R, fmt, s)
    if p:
        tr = p.get("transfer") or {}
        for tool, key in W_TRANSFER.items():
            if "error" in (tr.get(key) or {}):
                rows.append({"tool": tool, "error": tr[key]["error"]})
        if good(tr.get("push")):
            t = tr["push"]
            rows.append({"tool": W_PUSH, "bytes": t["bytes"], "ingest_secs": t["secs"],
                         "rebuild_secs": t["rebuild_secs"], "ingest_rss_kb": t["rss_kb"],
                         "rebuild_rss_kb": t["rebuild_rss_kb"], "identical": t["identical"],
                         "note": "on the pipe, out + in; " + delta_note(t)})
        if good(tr.get("push_nodelta")):
            t = tr["push_nodelta"]
            rows.append({"tool": W_PUSH_ND, "bytes": t["bytes"], "ingest_secs": t["secs"],
                         "rebuild_secs": t["rebuild_secs"], "ingest_rss_kb": t["rss_kb"],
                         "rebuild_rss_kb": t["rebuild_rss_kb"], "identical": t["identical"],
                         "note": f"on the pipe, out + in; {t['chunks_sent']} chunks sent whole"})
        if good(tr.get("bundle")):
            t = tr["bundle"]
            rows.append({"tool": W_BUNDLE, "bytes": t["bytes"], "ingest_secs": t["secs"],
                         "rebuild_secs": t["rebuild_secs"], "ingest_rss_kb": t["rss_kb"],
                         "rebuild_rss_kb": t["rebuild_rss_kb"], "identical": t["identical"],
                         "note": f"file size; unbundle {sec(t['unbundle_secs'])} s; " + delta_note(t)})
        rows.append({"tool": W_STORE, "bytes": p["stored_bytes"], "ingest_secs": p["add_secs"],
                     "rebuild_secs": p["extract_secs"], "ingest_rss_kb": p["add_rss_kb"],
                     "rebuild_rss_kb": p["extract_rss_kb"], "identical": p["identical"],
                     "note": f"stored_bytes of `add v2`; new raw {mb(p['new_bytes'])} MB"})
    for p in R.get("peers", []):
        if p["format"] == fmt and p["scenario"] == s:
            rows += p["rows"]
    return rows


def chart(R, png):
    if not shutil.which("gnuplot"):
        log("gnuplot not available: no chart")
        R.setdefault("notes", []).append("gnuplot not available: bytes.png not drawn")
        return
    fmts = chart_formats(R)
    work = os.path.dirname(os.path.abspath(png))
    tmpd = tempfile.mkdtemp(prefix="wharf-chart-")
    panels = []
    for f in fmts:
        tools = W_HEADLINE + headline_tools(R, f)
        scen = [s for s in R["scenarios"] if any(bytes_for(R, f, s, t) is not None for t in tools)]
        tools = [t for t in tools if any(bytes_for(R, f, s, t) is not None for s in scen)]
        dat = os.path.join(tmpd, f"{f}.dat")
        with open(dat, "w") as o:
            o.write("scenario " + " ".join(json.dumps(t) for t in tools) + "\n")
            for s in scen:
                vals = []
                for t in tools:
                    v = bytes_for(R, f, s, t)
                    vals.append(f"{max(v, 1) / 1e6:.6f}" if v is not None else "NaN")
                o.write(f"{s} " + " ".join(vals) + "\n")
        panels.append((f, dat, len(tools), v2size(R, f, scen[0]) if scen else None, len(scen)))
    h = 520 * len(panels)
    gp = [f"set terminal pngcairo size 1200,{h} font 'DejaVu Sans,11'",
          f"set output '{png}'",
          f"set multiplot layout {len(panels)},1",
          "set style data histograms", "set style histogram clustered gap 1.5",
          "set style fill solid 0.85 border -1", "set boxwidth 0.9",
          "set logscale y 10", "set yrange [0.001:2000]", "set format y '%g'",
          "set ytics ('0.001' 0.001, '0.01' 0.01, '0.1' 0.1, '1' 1, '10' 10, '100' 100, '1000' 1000)",
          "set grid ytics lc rgb '#dddddd'", "set key outside right top vertical",
          "set ylabel 'MB a receiver holding v1 needs for v2 (log scale)'",
          "set xtics nomirror", "set tics font ',11'",
          "set linetype 1 lc rgb '#d62728'", "set linetype 2 lc rgb '#ff9896'", "set linetype 3 lc rgb '#7f7f7f'",
          "set linetype 4 lc rgb '#bcbd22'", "set linetype 5 lc rgb '#1f77b4'", "set linetype 6 lc rgb '#aec7e8'",
          "set linetype 7 lc rgb '#2ca02c'", "set linetype 8 lc rgb '#ff7f0e'", "set linetype 9 lc rgb '#9467bd'",
          "set linetype 10 lc rgb '#8c564b'", "set linetype 11 lc rgb '#e377c2'", "set linetype 12 lc rgb '#17becf'"]
    for f, dat, n, size, nscen in panels:
        gp.append(f"set title \"{R['tier']} tier, format {f} (v2 = {mb(size)} MB; lower is better)\"")
        gp.append(f"set xrange [-0.6:{nscen - 0.4}]")
        gp.append(f"plot for [i=2:{n + 1}] '{dat}' using i:xtic(1) title columnheader(i)")
    gp.append("unset multiplot")
    script = os.path.join(tmpd, "bytes.gp")
    with open(script, "w") as o:
        o.write("\n".join(gp) + "\n")
    p = subprocess.run(["gnuplot", script], capture_output=True, text=True)
    if p.returncode != 0:
        log(f"gnuplot failed: {p.stderr[-500:]}")
    else:
        log(f"wrote {png}")
    shutil.rmtree(tmpd, ignore_errors=True)
    del work


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", choices=list(TIERS), default="small")
    ap.add_argument("--corpus", default=os.environ.get("WHARF_CORPUS_DIR", "/var/tmp/wharf-corpus"))
    ap.add_argument("--out", help="default benches/RESULTS.md (with --only garage / scale: benches/RESULTS-garage.md / "
                                  "RESULTS-scale.md)")
    ap.add_argument("--only", choices=["wharf", "peers", "garage", "scale", "all"], default="all",
                    help="wharf: store figures, throughput, the scale section, chunk study and the object-store "
                         "(Garage) figures; peers: the peer tools only; garage: the object-store figures only, written "
                         "to RESULTS-garage.md and results-garage.json; scale: the multi-GB image figures only, "
                         "written to RESULTS-scale.md and results-scale.json (with garage and scale, RESULTS.md and "
                         "results.json are left alone)")
    ap.add_argument("--scenarios", default="all", help="comma list, or all")
    ap.add_argument("--formats", default="all", help="comma list, or all (the tier's formats)")
    ap.add_argument("--peer-formats",
                    help="formats on which every peer runs (others get the cheap rows: full copy, registry); "
                         "comma list or all; default: legacy,oci-gzip-pigz on the small tier (the other two "
                         "formats repeat what those show), all on the large tier (its one format)")
    ap.add_argument("--zstd19", action="store_true",
                    help="also run zstd --patch-from -19 (about 150 s per small pair on 2 cores)")
    ap.add_argument("--quick", action="store_true", help="skip the peers and the chunk-size study")
    ap.add_argument("--no-transfer", action="store_true",
                    help="skip the push/bundle figures (wharf transfer) that otherwise run with the store figures")
    ap.add_argument("--no-garage", action="store_true", help="skip the object-store (Garage) figures")
    ap.add_argument("--garage", help="garage binary (default: $WHARF_GARAGE_BIN, else garage on PATH, else the CI "
                                     "cache's build); without one the object-store figures are skipped")
    ap.add_argument("--garage-nodelta-formats", default="legacy",
                    help="formats on which the object-store pushes and pulls also run with --no-deltas, besides "
                         "wharf's default (deltas); comma list, all or none")
    ap.add_argument("--garage-formats", default="legacy,oci",
                    help="formats the object-store figures run on (those of the run's formats in this list); "
                         "comma list or all")
    ap.add_argument("--no-scale", action="store_true", help="skip the scale section (one multi-GB image)")
    ap.add_argument("--scale-gb", type=float, default=3.0,
                    help="size of the scale section's generated image in GB (a whole number of copies of the corpus "
                         "v1 image's layers, the nearest to this)")
    ap.add_argument("--scale-cache",
                    help="where the scale image is kept between runs (default: the --work directory's name + "
                         "'-cache', e.g. /var/tmp/wharf-bench-cache); must be outside the repository and --work")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each throughput figure")
    ap.add_argument("--work", default=os.environ.get("WHARF_BENCH_WORK", "/var/tmp/wharf-bench"),
                    help="scratch directory (stores, repos, deltas); emptied at start and end")
    ap.add_argument("--wharf", help="wharf binary (default: target/release/wharf, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release -p wharf first")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install missing tools")
    ap.add_argument("--no-build-corpus", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS.md and bytes.png from results.json without measuring")
    args = ap.parse_args()

    # --only garage / --only scale keep their own files: the full run's RESULTS.md, results.json and bytes.png
    # stay as they are.
    partial = args.only if args.only in ("garage", "scale") else None
    out_md = os.path.abspath(args.out or os.path.join(HERE, f"RESULTS-{partial}.md" if partial else "RESULTS.md"))
    png = None if partial else os.path.join(os.path.dirname(out_md), "bytes.png")
    raw = os.path.join(os.path.dirname(out_md), f"results-{partial}.json" if partial else "results.json")
    os.makedirs(os.path.dirname(out_md), exist_ok=True)
    if args.report_only:
        with open(raw) as f:
            R = json.load(f)
        report(R, out_md, png)
        return

    tier = TIERS[args.tier]
    scenarios = tier["scenarios"] if args.scenarios == "all" else args.scenarios.split(",")
    formats = tier["formats"] if args.formats == "all" else args.formats.split(",")
    if args.peer_formats is None:
        args.peer_formats = "legacy,oci-gzip-pigz" if args.tier == "small" else "all"
    peer_formats = formats if args.peer_formats == "all" else args.peer_formats.split(",")
    for s in scenarios:
        if s not in tier["scenarios"]:
            raise SystemExit(f"unknown scenario {s} for tier {args.tier}: {tier['scenarios']}")
    for f in formats:
        if f not in tier["formats"] and args.tier == "small":
            raise SystemExit(f"unknown format {f}: {tier['formats']}")
    do_wharf = args.only in ("wharf", "all")
    do_peers = args.only in ("peers", "all") and not args.quick
    do_chunks = do_wharf and not args.quick
    do_garage = args.only in ("wharf", "garage", "all")
    do_scale = args.only in ("wharf", "scale", "all")
    # the scale image is built from the v1 of a format with uncompressed layers (legacy if the run has it)
    scale_fmt = next((f for f in ["legacy"] + formats if f in formats and "gzip" not in f), None)
    garage_formats = [f for f in formats if args.garage_formats == "all" or f in args.garage_formats.split(",")]

    work = os.path.abspath(args.work)
    if os.path.commonpath([work, REPO]) == REPO:
        raise SystemExit("--work must be outside the repository")
    scale_cache = os.path.abspath(args.scale_cache or work + "-cache")
    if do_scale and (os.path.commonpath([scale_cache, REPO]) == REPO
                     or os.path.commonpath([scale_cache, work]) in (work, scale_cache)):
        raise SystemExit("--scale-cache must be outside the repository and outside --work (which is emptied)")
    fresh_dir(work)
    disk = DiskPeak(work)
    tools = Tools(not args.no_install)
    for c in ([] if partial else LIMIT_TOOLS + ["gnuplot"]) + (PEER_TOOLS if do_peers else []):
        tools.have(c)
    if do_garage and not args.no_garage and not garage_binary(args.garage) and tools.cargo_install:
        build_garage()

    R = {"command": "python3 benches/run.py " + q(sys.argv[1:]) if sys.argv[1:] else "python3 benches/run.py",
         "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
         "load_start": list(load()), "tier": args.tier, "corpus": os.path.abspath(args.corpus),
         "formats": formats, "scenarios": scenarios, "sections": [], "notes": [], "work": work,
         "reps": args.reps, "section_loads": {}}
    R["command"] = R["command"].replace("python3 benches/run.py ", "python3 benches/run.py ", 1)
    if partial == "scale":  # only the scale image's source is needed
        if not scale_fmt:
            raise SystemExit(f"--only scale needs a format with uncompressed layers among {formats}")
        R["formats"], R["scenarios"] = [scale_fmt], scenarios[:1]
        pairs = load_corpus(R["corpus"], args.tier, [scale_fmt], scenarios[:1], not args.no_build_corpus,
                            tools)
    else:
        pairs = load_corpus(R["corpus"], args.tier, formats, scenarios, not args.no_build_corpus, tools)
    for v1, v2 in pairs.values():
        for e in (v1, v2):
            e["path"] = os.path.join(R["corpus"], e["file"])
    exe, winfo = wharf_binary(args, work)
    R["wharf"] = winfo
    wh = Wharf(exe)
    cfg = wh.init(os.path.join(work, "probe"))
    rm(os.path.join(work, "probe"))
    R["default_avg_kib"] = cfg["chunking"]["avg"] // 1024
    R["default_zstd"] = cfg["zstd_level"]
    m = re.search(r"--delta-level[^\[]*\[default: (\d+)\]",
                  subprocess.run([exe, "push", "--help"], capture_output=True, text=True).stdout)
    R["delta_level"] = int(m.group(1)) if m else None

    meter = {}

    def section(name):
        end_section()
        R["sections"].append(name)
        R["section_loads"][name] = round(load()[0], 2)
        meter["name"], meter["m"] = name, CpuMeter()
        log(f"== {name} (load {load()[0]:.2f})")

    def end_section():
        if meter.get("m"):
            c = meter["m"].stop()
            R.setdefault("section_cpu", {})[meter["name"]] = c
            if c:
                log(f"== end of {meter['name']}: {c['wall']:.0f} s; other processes used {c['other_cpu']:.0f} "
                    f"CPU-s ({100 * c['other_share']:.0f}% of the machine)")
            meter.clear()

    def save():
        R["elapsed_min"] = (time.monotonic() - T0) / 60
        R["load_end"] = list(load())
        R["tool_versions"] = {c: tools.version(c) for c in
                              ["zstd", "b3sum", "openssl", "gzip", "xdelta3", "rsync", "casync", "borg", "restic",
                               "bita", "gnuplot"] if shutil.which(c) or c in tools.notes}
        R["notes"] = sorted(set(R["notes"]) | set(tools.notes.values()))
        R["work_peak_bytes"] = disk.peak
        with open(raw, "w") as f:
            json.dump(R, f, indent=1)
        report(R, out_md, png)

    try:
        if do_wharf:
            section("wharf store figures" + ("" if args.no_transfer else " and transfers"))
            R["pairs"] = bench_wharf_pairs(wh, pairs, formats, scenarios, work, not args.no_transfer)
            for p in R["pairs"]:
                p["v1_size"] = pairs[(p["format"], p["scenario"])][0]["size"]
            section("throughput")
            fmt = "legacy" if "legacy" in formats else formats[0]
            img = pairs[(fmt, scenarios[0])][0]
            R["throughput"] = bench_throughput(wh, tools, img, work, args.reps)
            gz = [f for f in ("oci-gzip-pigz", "oci-gzip-py") if f in formats]
            if gz:
                R["gzip_throughput"] = bench_gzip_throughput(wh, tools, pairs[(gz[0], scenarios[0])][0], work)
            save()
        if do_scale:
            why = ("--no-scale" if args.no_scale else
                   f"no format with uncompressed layers among {', '.join(formats)}" if not scale_fmt else None)
            if why:
                log(f"scale: skipped: {why}")
                R["scale"] = {"skipped": why}
            else:
                section("scale: one multi-GB image")
                R["scale"] = bench_scale(wh, pairs[(scale_fmt, scenarios[0])][0], work, args.reps, args.scale_gb,
                                         scale_cache)
            save()
        if do_chunks:
            fmt = "legacy" if "legacy" in formats else formats[0]
            section("chunk-size study")
            R["chunk_format"] = fmt
            R["chunks"] = bench_chunks(wh, pairs, fmt, scenarios, work, args.reps)
            R["chunk_recommendation"] = recommend_chunk(R["chunks"], scenarios)
            if R["chunk_recommendation"]:
                log("chunk-size recommendation: " + R["chunk_recommendation"]["why"])
            save()
        if do_garage:
            gbin = garage_binary(args.garage)
            why = ("--no-garage" if args.no_garage else
                   "no garage binary (set WHARF_GARAGE_BIN, put garage on PATH or pass --garage BIN)" if not gbin else
                   f"garage binary {gbin} does not exist" if not os.path.isfile(gbin) else
                   f"none of the run's formats is in --garage-formats {args.garage_formats}" if not garage_formats
                   else None)
            if why:
                log(f"object store (Garage): skipped: {why}")
                R["garage"] = {"skipped": why}
            else:
                section("object store (Garage)")
                nd = args.garage_nodelta_formats
                nd = garage_formats if nd == "all" else [] if nd == "none" else nd.split(",")
                R["garage"] = bench_garage(wh, pairs, garage_formats, scenarios, work, gbin, nd)
            save()
        if do_peers:
            section("peers (full on " + ", ".join(f for f in formats if f in peer_formats)
                                 + (", with zstd -19" if args.zstd19 else "") + ")")
            R["peers"] = bench_peers(pairs, formats, scenarios, peer_formats, tools, work, args.zstd19)
        if not args.zstd19 and do_peers:
            R["notes"].append("zstd --patch-from -19 was not run (it takes minutes per pair on 2 cores); "
                              "pass --zstd19 to include it")
        if args.quick:
            R["notes"].append("--quick: peers and the chunk-size study skipped")
        if partial:
            R["notes"].append(f"--only {partial}: only the "
                              + ("object-store" if partial == "garage" else "scale") + " section ran "
                              "(benches/RESULTS.md holds the last full run)")
        else:
            R["notes"].append(
                "Byte repeatability: every byte figure comes from the same corpus bytes and deterministic settings "
                "(restic's chunker polynomial is fixed by benches/restic-template). Three sources of noise remain, "
                "all far below the printed resolution (1 kB or coarser): wharf's `stored_bytes` (and the push and "
                "bundle bytes, which carry the recipe) can differ by 1-2 bytes "
                "between runs because the recipe records the time of the add (`created`) and is stored compressed; "
                "borg's and restic's by a few dozen bytes because their archive and tree metadata hold timestamps.")
    finally:
        end_section()
        disk.done()
        save()
        rm(work)
    log(f"done in {(time.monotonic() - T0) / 60:.1f} min")


if __name__ == "__main__":
    main()
