#!/usr/bin/env python3
"""A real three-node Garage cluster on loopback, for benchmarks and manual tests.

A port of objstore/tests/common/garage.rs (same configuration, same steps):
GarageCluster.start() writes one config per node under a work directory
(replication factor 3, consistency mode "consistent", LMDB metadata, or SQLite
if LMDB will not start), launches `garage server` for each on free loopback
ports, and drives the setup with the `garage` CLI exactly as an operator would:

    garage -c NI node id; garage -c NI status             (per node, until its RPC answers)
    garage -c N0 node connect ID1@127.0.0.1:RPC1           (and ID2)
    garage -c N0 status                                    (until all 3 are healthy)
    garage -c N0 layout assign -z dc1 -c 1G ID0 ID1 ID2
    garage -c N0 layout apply --version 1
    garage -c N0 bucket create BUCKET
    garage -c N0 key create wharf-test-key                 (key ID and secret parsed from it)
    garage -c N0 bucket allow --read --write --owner BUCKET --key KEYID

and then polls until an S3 PUT on node 0 reads back through every node. Every
wait polls against one overall deadline; nothing sleeps blindly. Each node's
output goes to node-I.log in the work directory, and every error carries the
tail of those logs. stop() kills the nodes (SIGKILL) and, unless keep=True or
WHARF_GARAGE_KEEP is set, removes what start() wrote in the work directory.

Library use (benches/run.py):

    c = GarageCluster(GarageCluster.binary(), "/var/tmp/g", "wharf")
    c.start()
    env = c.env()          # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP
    c.list_objects("prefix/")   # [(key, size)], a small SigV4 client of its own
    c.stop()

Standalone, for manual testing:

    python3 benches/garage.py up DIR [--bucket wharf] [--bin GARAGE]

starts a cluster with its files in DIR, prints `export ...` lines for the
environment and stays in the foreground until Ctrl-C or SIGTERM, then stops the
nodes (DIR keeps the logs; pass --rm to remove it).

The garage binary: --bin, else $WHARF_GARAGE_BIN, else `garage` on PATH, else
the CI cache (`.ci/garage.sh path`: ${WHARF_CI_CACHE:-~/.cache/wharf-ci}/garage-2.5.0/bin/garage).
Python 3.11, standard library only.
"""

import datetime
import hashlib
import hmac
import http.client
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import xml.etree.ElementTree as ET

NODES = 3                 # nodes in the cluster, and the replication factor
REGION = "garage"
START_BUDGET = 60.0       # the whole of start() must finish within this (seconds)
CLI_TIMEOUT = 10.0        # one CLI invocation may take at most this long
POLL = 0.1                # pause between two polls
LOG_TAIL_LINES = 25       # lines of each node's log quoted in an error
KEY_NAME = "wharf-test-key"
READY_OBJECT = ".wharf-garage-ready"
CI_GARAGE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "garage.sh")


def ci_garage(mode):
    """`.ci/garage.sh path` (where CI keeps its build) or `build` (build it there first when missing):
    the binary's path, or None when the script fails (its stderr, which says why, is passed through)."""
    try:
        p = subprocess.run([CI_GARAGE_SCRIPT, mode], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    except OSError:
        return None
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else None


class GarageError(Exception):
    pass


class _NodeExited(Exception):
    pass


class GarageCluster:
    def __init__(self, bin, workdir, bucket="wharf"):
        self.bin = os.path.abspath(bin) if bin else None
        self.dir = os.path.abspath(workdir)
        self.bucket = bucket
        self.rpc_secret = secrets.token_hex(32)
        self.procs = [None] * NODES
        self.configs = [os.path.join(self.dir, f"node-{i}.toml") for i in range(NODES)]
        self.logs = [os.path.join(self.dir, f"node-{i}.log") for i in range(NODES)]
        self.engines = ["lmdb"] * NODES
        self.rpc_ports, self.s3_ports = [], []
        self.node_ids = []
        self.key_id = self.secret = ""
        self.cli_runs = 0
        self.started = False
        self.start_secs = None

    # ------------------------------------------------------------ finding garage

    @staticmethod
    def binary():
        """$WHARF_GARAGE_BIN (returned even if missing: start() then says so), else `garage` on PATH,
        else the CI cache's build, else None."""
        p = os.environ.get("WHARF_GARAGE_BIN", "")
        if p:
            return p
        p = shutil.which("garage")
        if p:
            return p
        p = ci_garage("path")
        return p if p and os.access(p, os.X_OK) else None

    def version(self):
        try:
            out = subprocess.run([self.bin, "--version"], capture_output=True, text=True, timeout=10,
                                 env=_scrubbed_env()).stdout
            return out.strip().splitlines()[0] if out.strip() else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    # ------------------------------------------------------------ lifecycle

    def start(self):
        """Starts 3 nodes on loopback, forms the cluster, creates the bucket and an access key allowed
        read+write+owner on it, and waits until an S3 PUT/GET works through every node. Returns self.
        Raises GarageError (with the nodes' log tails) on failure, having killed the nodes it started
        (their files stay until stop())."""
        t0 = time.monotonic()
        deadline = t0 + START_BUDGET
        if not self.bin or not os.path.isfile(self.bin):
            raise GarageError(f"garage binary {self.bin} does not exist")
        os.makedirs(self.dir, exist_ok=True)
        for i in range(NODES):   # a second start(): the previous nodes go first
            self.kill_node(i)
        self._clear_own_files()
        self.node_ids, self.engines = [], ["lmdb"] * NODES
        ports = free_ports(2 * NODES)
        self.rpc_ports, self.s3_ports = ports[:NODES], ports[NODES:]
        self.started = True
        try:
            for i in range(NODES):
                self._launch(i)
            for i in range(NODES):
                try:
                    nid = self._wait_node_ready(i, deadline)
                except _NodeExited as e:
                    if self.engines[i] != "lmdb":
                        raise self._fail(str(e)) from None
                    # LMDB would not open here (e.g. no mmap); SQLite then.
                    print(f"garage node {i}: {e}; retrying with db_engine = \"sqlite\"", file=sys.stderr)
                    self.engines[i] = "sqlite"
                    self._launch(i)
                    try:
                        nid = self._wait_node_ready(i, deadline)
                    except _NodeExited as e2:
                        raise self._fail(str(e2)) from None
                self.node_ids.append(nid)

            # Introduce nodes 1 and 2 to node 0; they learn of each other from it.
            for i in range(1, NODES):
                peer = f"{self.node_ids[i]}@127.0.0.1:{self.rpc_ports[i]}"
                self._cli_retry(0, ["node", "connect", peer], deadline, "connecting nodes")
            self._wait_healthy(deadline)

            self._cli_retry(0, ["layout", "assign", "-z", "dc1", "-c", "1G", *self.node_ids], deadline,
                            "assigning the layout")
            # Not retried: a retry after a success would fail on the version.
            try:
                self._cli(0, ["layout", "apply", "--version", "1"], self._cli_timeout(deadline))
            except GarageError as e:
                raise self._fail(f"applying the layout: {e}") from None

            # A timed-out first try may still have created it.
            self._cli_retry(0, ["bucket", "create", self.bucket], deadline, "creating the bucket",
                            ok_error=lambda err: "already" in err.lower())
            created = self._cli_retry(0, ["key", "create", KEY_NAME], deadline, "creating a key")
            key = parse_key(created)
            if not key:
                info = self._cli_retry(0, ["key", "info", "--show-secret", KEY_NAME], deadline, "reading the key")
                key = parse_key(info)
                if not key:
                    raise self._fail(f"no key ID and secret in `garage key create` output:\n{created}\n"
                                     f"nor in `garage key info --show-secret`:\n{info}")
            self.key_id, self.secret = key
            self._cli_retry(0, ["bucket", "allow", "--read", "--write", "--owner", self.bucket,
                                "--key", self.key_id], deadline, "allowing the key on the bucket")
            self._wait_s3(deadline)
        except BaseException:
            for i in range(NODES):   # the files stay, for the logs; stop() removes them
                self.kill_node(i)
            raise
        self.start_secs = time.monotonic() - t0
        return self

    def stop(self, keep=None):
        """Kills the nodes (SIGKILL) and reaps them; removes the files start() wrote unless keep
        (default: $WHARF_GARAGE_KEEP set)."""
        for i in range(NODES):
            self.kill_node(i)
        if keep is None:
            keep = bool(os.environ.get("WHARF_GARAGE_KEEP"))
        if keep:
            if self.started:
                print(f"garage cluster files kept in {self.dir}", file=sys.stderr)
        else:
            self._clear_own_files()
        self.started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def kill_node(self, i):
        """Kills node i (SIGKILL, by its own pid) and reaps it; a no-op if it is already gone."""
        p = self.procs[i]
        self.procs[i] = None
        if p is not None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    # ------------------------------------------------------------ what clients need

    def endpoint(self, i=0):
        """http://127.0.0.1:PORT of node i's S3 API."""
        return f"http://127.0.0.1:{self.s3_ports[i]}"

    def env(self):
        """Environment a client needs: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
        AWS_ENDPOINT_URL (node 0), AWS_ALLOW_HTTP=true."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint(0), "AWS_ALLOW_HTTP": "true"}

    def client(self, node=0, timeout=30.0):
        return S3Client(self.endpoint(node), self.key_id, self.secret, REGION, timeout)

    def list_objects(self, prefix=""):
        """[(key, size)] of every object in the bucket under prefix (ListObjectsV2 via node 0)."""
        return self.client().list(self.bucket, prefix)

    def cpu_secs(self):
        """CPU seconds (user + system) the running nodes have used so far, from /proc/PID/stat."""
        total = 0.0
        for p in self.procs:
            if p is None:
                continue
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                pass
        return total

    def log_offset(self, node=0):
        """Current size of node's log: pass it to requests_since() to count what came after."""
        try:
            return os.path.getsize(self.logs[node])
        except OSError:
            return 0

    def requests_since(self, offset, node=0):
        """S3 requests node's log shows after offset (Garage logs one INFO line per request it receives):
        {"GET", "LIST", "PUT", "PUT_PART", "MP_CREATE", "MP_COMPLETE", "DELETE_MULTI", "HEAD", "DELETE",
        "OTHER", "requests"}: PUT_PART = an upload part, MP_CREATE / MP_COMPLETE = the POSTs that create and
        complete a multipart upload, DELETE_MULTI = a DeleteObjects POST. Requests from any client count."""
        counts = dict.fromkeys(("GET", "LIST", "PUT", "PUT_PART", "MP_CREATE", "MP_COMPLETE", "DELETE_MULTI",
                                "HEAD", "DELETE", "OTHER"), 0)
        try:
            with open(self.logs[node], "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        for m in re.finditer(r"generic_server: \S+ \(key [^)]*\) ([A-Z]+) (\S+)", strip_ansi(text)):
            method, path = m.group(1), m.group(2)
            bare = "/" not in path.split("?")[0].strip("/")   # /bucket or /bucket?query: a bucket-level call
            if method == "GET" and bare:
                counts["LIST"] += 1
            elif method == "PUT" and "partNumber=" in path:
                counts["PUT_PART"] += 1
            elif method == "POST" and re.search(r"[?&]uploads(=|&|$)", path):
                counts["MP_CREATE"] += 1
            elif method == "POST" and "uploadId=" in path:
                counts["MP_COMPLETE"] += 1
            elif method == "POST" and re.search(r"[?&]delete(=|&|$)", path):
                counts["DELETE_MULTI"] += 1
            elif method in counts:
                counts[method] += 1
            else:
                counts["OTHER"] += 1
        counts["requests"] = sum(counts.values())
        return counts

    def data_bytes(self):
        """Apparent size of the nodes' data and metadata directories (all replicas)."""
        total = 0
        for i in range(NODES):
            for root, _, files in os.walk(os.path.join(self.dir, f"node-{i}")):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(root, f)).st_size
                    except OSError:
                        pass
        return total

    def log_tails(self):
        out = []
        for i, log in enumerate(self.logs):
            out.append(f"\n--- garage node {i} ({log}), last {LOG_TAIL_LINES} lines ---")
            try:
                with open(log, "rb") as f:
                    lines = strip_ansi(f.read().decode(errors="replace")).splitlines()
                out.extend(lines[-LOG_TAIL_LINES:])
            except OSError as e:
                out.append(f"(cannot read: {e})")
        return "\n".join(out) + "\n"

    # ------------------------------------------------------------ internals

    def _fail(self, msg):
        return GarageError(f"garage cluster: {msg}{self.log_tails()}")

    def _clear_own_files(self):
        for i in range(NODES):
            for p in (os.path.join(self.dir, f"node-{i}"), self.configs[i], self.logs[i]):
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.lexists(p):
                    os.unlink(p)
        if os.path.isdir(self.dir):
            for f in os.listdir(self.dir):
                if re.fullmatch(r"cli-\d+\.(out|err)", f):
                    os.unlink(os.path.join(self.dir, f))

    def _launch(self, i):
        """Writes node i's config and starts `garage server` for it."""
        self.kill_node(i)
        node_dir = os.path.join(self.dir, f"node-{i}")
        meta, data = os.path.join(node_dir, "meta"), os.path.join(node_dir, "data")
        if os.path.exists(meta):  # a previous attempt with another db engine
            shutil.rmtree(meta)
        for d in (meta, data):
            os.makedirs(d, exist_ok=True)
        config = (f"metadata_dir = {toml_str(meta)}\n"
                  f"data_dir = {toml_str(data)}\n"
                  f"db_engine = \"{self.engines[i]}\"\n"
                  f"replication_factor = {NODES}\n"
                  "consistency_mode = \"consistent\"\n"
                  f"rpc_bind_addr = \"127.0.0.1:{self.rpc_ports[i]}\"\n"
                  f"rpc_public_addr = \"127.0.0.1:{self.rpc_ports[i]}\"\n"
                  f"rpc_secret = \"{self.rpc_secret}\"\n"
                  "\n"
                  "[s3_api]\n"
                  f"s3_region = \"{REGION}\"\n"
                  f"api_bind_addr = \"127.0.0.1:{self.s3_ports[i]}\"\n")
        # Garage refuses a world-readable file holding the rpc secret.
        fd = os.open(self.configs[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config)
        os.chmod(self.configs[i], 0o600)
        log = open(self.logs[i], "ab")
        try:
            self.procs[i] = subprocess.Popen([self.bin, "-c", self.configs[i], "server"],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env=_scrubbed_env())
        except OSError as e:
            raise GarageError(f"starting `{self.bin} -c {self.configs[i]} server`: {e}") from None
        finally:
            log.close()

    def _exited(self, i):
        p = self.procs[i]
        if p is None:
            return None
        rc = p.poll()
        return None if rc is None else f"node {i} exited (status {rc})"

    def _check_alive(self):
        for i in range(NODES):
            why = self._exited(i)
            if why:
                raise self._fail(f"{why} during setup")

    def _cli_timeout(self, deadline):
        return min(max(deadline - time.monotonic(), 1.0), CLI_TIMEOUT)

    def _cli(self, node, args, timeout):
        """Runs `garage -c <node's config> ARGS`, killed after timeout. Returns stdout;
        raises GarageError(context + stderr + stdout) otherwise."""
        self.cli_runs += 1
        what = f"`garage {' '.join(args)}` on node {node}"
        try:
            p = subprocess.run([self.bin, "-c", self.configs[node], *args], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout, env=_scrubbed_env())
        except subprocess.TimeoutExpired:
            raise GarageError(f"{what}: no answer within {timeout:.1f} s") from None
        except OSError as e:
            raise GarageError(f"{what}: cannot run: {e}") from None
        if p.returncode == 0:
            return p.stdout
        msg = f"{what} failed (status {p.returncode}): {strip_ansi(p.stderr.strip())}"
        if p.stdout.strip():
            msg += f"\nstdout: {strip_ansi(p.stdout.strip())}"
        raise GarageError(msg)

    def _cli_retry(self, node, args, deadline, what, ok_error=lambda err: False):
        """Retries a CLI command until it succeeds, ok_error accepts its error (from the second try on),
        or the deadline passes."""
        tries = 0
        while True:
            self._check_alive()
            tries += 1
            try:
                return self._cli(node, args, self._cli_timeout(deadline))
            except GarageError as e:
                last = str(e)
                if tries > 1 and ok_error(last):
                    return ""
            if time.monotonic() + POLL >= deadline:
                raise self._fail(f"{what}: gave up after {tries} tries; last error: {last}")
            time.sleep(POLL)

    def _wait_node_ready(self, i, deadline):
        """Polls node i until it answers RPC; returns its full node ID. Raises _NodeExited if it died."""
        nid, last = None, "not tried yet"
        while True:
            why = self._exited(i)
            if why:
                raise _NodeExited(why)
            timeout = self._cli_timeout(deadline)
            if nid is None:
                try:
                    out = self._cli(i, ["node", "id"], timeout)
                    nid = parse_node_id(out)
                    if nid is None:
                        last = f"no node ID in `garage node id` output: {out}"
                except GarageError as e:
                    last = str(e)
            # `node id` may be answered from disk; `status` needs the daemon.
            if nid is not None:
                try:
                    self._cli(i, ["status"], timeout)
                    return nid
                except GarageError as e:
                    last = str(e)
            if time.monotonic() + POLL >= deadline:
                raise self._fail(f"node {i} did not come up in time; last error: {last}")
            time.sleep(POLL)

    def _wait_healthy(self, deadline):
        """Polls node 0's `status` until it lists every node as healthy."""
        while True:
            self._check_alive()
            try:
                out = self._cli(0, ["status"], self._cli_timeout(deadline))
                # Healthy nodes come first; failed ones follow a header.
                healthy = out.split("FAILED NODES")[0]
                missing = [i for i in range(NODES) if self.node_ids[i][:16] not in healthy]
                if not missing:
                    return
                last = f"nodes {missing} not healthy yet:\n{out}"
            except GarageError as e:
                last = str(e)
            if time.monotonic() + POLL >= deadline:
                raise self._fail(f"nodes did not all become healthy in time; last: {last}")
            time.sleep(POLL)

    def _wait_s3(self, deadline):
        """Polls until a PUT on node 0 reads back through every node's S3 API."""
        while True:
            left = deadline - time.monotonic()
            timeout = min(max(left, 0.5), 5.0)
            try:
                self._s3_round_trip(timeout)
                return
            except (GarageError, OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() + POLL >= deadline:
                raise self._fail(f"S3 PUT/GET did not work in time; last error: {last}")
            time.sleep(POLL)

    def _s3_round_trip(self, timeout):
        """One readiness attempt: PUT via node 0, GET via every node, DELETE."""
        body = f"ready {secrets.token_hex(8)}".encode()
        clients = [self.client(i, timeout) for i in range(NODES)]
        clients[0].put(self.bucket, READY_OBJECT, body)
        for i, c in enumerate(clients):
            got = c.get(self.bucket, READY_OBJECT)
            if got != body:
                raise GarageError(f"GET via {self.endpoint(i)} returned {got!r}, not {body!r}")
        clients[0].delete(self.bucket, READY_OBJECT)


# ---------------------------------------------------------------- a minimal S3 client (SigV4)

class S3Client:
    """Path-style S3 requests signed with AWS Signature Version 4; enough for readiness probes and
    for listing what a benchmark left in the bucket."""

    def __init__(self, endpoint, key_id, secret, region=REGION, timeout=30.0):
        u = urllib.parse.urlsplit(endpoint)
        self.host, self.port = u.hostname, u.port or 80
        self.netloc = u.netloc
        self.key_id, self.secret, self.region, self.timeout = key_id, secret, region, timeout

    def request(self, method, bucket, key="", query=None, body=b"", extra_headers=None):
        """One request; extra_headers (e.g. Range) are sent unsigned. Returns the body; raises
        GarageError on an HTTP status of 300 or more."""
        path = "/" + bucket + ("/" + key if key else "")
        cpath = urllib.parse.quote(path, safe="/-_.~")
        q = sorted((query or {}).items())
        cquery = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(str(v), safe='-_.~')}"
                          for k, v in q)
        now = datetime.datetime.now(datetime.timezone.utc)
        amzdate, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        phash = hashlib.sha256(body).hexdigest()
        headers = {"host": self.netloc, "x-amz-content-sha256": phash, "x-amz-date": amzdate}
        signed = ";".join(sorted(headers))
        creq = "\n".join([method, cpath, cquery, "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                          signed, phash])
        scope = f"{day}/{self.region}/s3/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        headers["content-length"] = str(len(body))
        headers.update(extra_headers or {})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, cpath + ("?" + cquery if cquery else ""), body=body or None, headers=headers)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        if r.status >= 300:
            raise GarageError(f"{method} {path} via {self.netloc}: HTTP {r.status}: "
                              f"{data[:300].decode(errors='replace')}")
        return data

    def put(self, bucket, key, body):
        self.request("PUT", bucket, key, body=body)

    def get(self, bucket, key, start=None, end=None):
        """The object, or bytes start..end (inclusive) of it."""
        rng = {"range": f"bytes={start}-{'' if end is None else end}"} if start is not None else None
        return self.request("GET", bucket, key, extra_headers=rng)

    def delete(self, bucket, key):
        self.request("DELETE", bucket, key)

    def list(self, bucket, prefix=""):
        out, token = [], None
        while True:
            q = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                q["continuation-token"] = token
            root = ET.fromstring(self.request("GET", bucket, query=q))
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for c in root.findall(f"{ns}Contents"):
                out.append((c.findtext(f"{ns}Key"), int(c.findtext(f"{ns}Size") or 0)))
            if (root.findtext(f"{ns}IsTruncated") or "").lower() != "true":
                return out
            token = root.findtext(f"{ns}NextContinuationToken")
            if not token:
                return out


# ---------------------------------------------------------------- helpers

def _scrubbed_env():
    """Keeps the caller's GARAGE_* settings (config file, RPC host, secret, tokens) from steering the
    cluster, and keeps logs free of colour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GARAGE_")}
    env["NO_COLOR"] = "1"
    return env


def free_ports(n):
    """n distinct free loopback ports (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def toml_str(p):
    return '"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_node_id(out):
    """The 64-hex-digit node ID from `garage node id` (`ID@ADDR`)."""
    for line in out.splitlines():
        nid = line.strip().split("@")[0]
        if len(nid) == 64 and all(c in "0123456789abcdefABCDEF" for c in nid):
            return nid
    return None


def parse_key(out):
    """(key ID, secret) from `garage key create` / `key info` (`Key ID:` and `Secret key:` lines)."""
    def field(name):
        for line in out.splitlines():
            line = line.strip()
            if line.startswith(name):
                v = line[len(name):].strip()
                if v:
                    return v
        return None
    kid, sec = field("Key ID:"), field("Secret key:")
    return (kid, sec) if kid and sec else None


def strip_ansi(s):
    return re.sub(r"\x1b\[[^A-Za-z]*[A-Za-z]|\x1b", "", s)


# ---------------------------------------------------------------- standalone

def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="A 3-node Garage cluster on loopback (see the module docstring).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster, print `export ...` lines, run until Ctrl-C or SIGTERM")
    up.add_argument("dir", help="work directory for configs, data and node-I.log")
    up.add_argument("--bucket", default="wharf")
    up.add_argument("--bin", help="garage binary (default: $WHARF_GARAGE_BIN, garage on PATH, the CI cache)")
    up.add_argument("--rm", action="store_true", help="remove the cluster's files at exit (default: keep them)")
    args = ap.parse_args(argv)

    bin = args.bin or GarageCluster.binary()
    if not bin:
        raise SystemExit("no garage binary: pass --bin, set WHARF_GARAGE_BIN or put garage on PATH")
    c = GarageCluster(bin, args.dir, args.bucket)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        c.start()
    except GarageError as e:
        raise SystemExit(str(e))
    except KeyboardInterrupt:
        return 130
    try:
        print(f"# {c.version()}: 3 nodes up in {c.start_secs:.1f} s; files in {c.dir}", file=sys.stderr)
        for k, v in c.env().items():
            print(f"export {k}={v}")
        print(f"# then e.g.: wharf --store s3://{c.bucket}/test init", file=sys.stderr)
        for i in range(NODES):
            print(f"# node {i}: S3 {c.endpoint(i)}, RPC 127.0.0.1:{c.rpc_ports[i]}, "
                  f"garage -c {c.configs[i]} status", file=sys.stderr)
        print("# Ctrl-C or SIGTERM stops the cluster", file=sys.stderr, flush=True)
        sys.stdout.flush()
        while True:
            for i in range(NODES):
                why = c._exited(i)
                if why:
                    print(f"garage: {why}{c.log_tails()}", file=sys.stderr)
                    return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping the garage cluster", file=sys.stderr)
        return 0
    finally:
        c.stop(keep=not args.rm)


if __name__ == "__main__":
    sys.exit(main())
