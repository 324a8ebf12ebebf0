#!/usr/bin/env python3
"""gzip layers made by Go's compress/gzip: what wharf stores beside them to rebuild them exactly.

    python3 benches/go_gzip.py [--corpus DIR] [--wharf BIN] [--work DIR]

Docker, containerd and BuildKit compress layers with Go's standard compress/gzip
(BestSpeed or DefaultCompression, depending on the tool). This takes the layer
tars of the corpus image images/small/legacy/pyml-small_v1.tar, compresses each
with a ten-line Go program at both levels, puts the blobs in a tar (as members of
an image archive, where wharf looks for compressed layers), adds it to a fresh
store, and reads back from `wharf info --json` how each layer was stored: by its
plaintext with preflate's reconstruction data (and how many bytes of it), or as
the compressed bytes (and why). Then `wharf extract` must give the same bytes.

Writes benches/results-go-gzip.json; `benches/run.py` puts it in RESULTS.md
(section "gzip layers made by Go"). Needs `go` (Debian's golang-go).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

GO_PROGRAM = """package main

import (
\t"compress/gzip"
\t"io"
\t"os"
\t"strconv"
)

func main() {
\tlevel, _ := strconv.Atoi(os.Args[1])
\tw, err := gzip.NewWriterLevel(os.Stdout, level)
\tif err != nil {
\t\tpanic(err)
\t}
\tif _, err := io.Copy(w, os.Stdin); err != nil {
\t\tpanic(err)
\t}
\tif err := w.Close(); err != nil {
\t\tpanic(err)
\t}
}
"""

LEVELS = [("DefaultCompression", -1), ("BestSpeed", 1)]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=os.environ.get("WHARF_CORPUS_DIR", "/var/tmp/wharf-corpus"))
    ap.add_argument("--wharf", default=os.path.join(REPO, "target", "release", "wharf"))
    ap.add_argument("--work", default="/var/tmp/wharf-go-gzip")
    ap.add_argument("--out", default=os.path.join(HERE, "results-go-gzip.json"))
    args = ap.parse_args()
    if not shutil.which("go"):
        raise SystemExit("go not found: apt-get install golang-go")
    src = os.path.join(args.corpus, "images/small/legacy/pyml-small_v1.tar")
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    gz_dir = os.path.join(args.work, "go")
    os.makedirs(gz_dir)
    with open(os.path.join(gz_dir, "main.go"), "w") as f:
        f.write(GO_PROGRAM)
    run(["go", "mod", "init", "gz"], cwd=gz_dir, capture_output=True)
    gzbin = os.path.join(gz_dir, "gz")
    run(["go", "build", "-o", gzbin, "."], cwd=gz_dir, env={**os.environ, "GOFLAGS": "-mod=mod",
                                                           "GOCACHE": os.path.join(args.work, "gocache")})
    go_version = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip()

    layers = []
    with tarfile.open(src) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.endswith("layer.tar"):
                p = os.path.join(args.work, f"layer{len(layers)}.tar")
                with t.extractfile(m) as r, open(p, "wb") as w:
                    shutil.copyfileobj(r, w, 1 << 20)
                layers.append(p)

    rows = []
    for label, level in LEVELS:
        blobs = []
        for i, lp in enumerate(layers):
            gp = os.path.join(args.work, f"layer{i}.{label}.gz")
            with open(lp, "rb") as r, open(gp, "wb") as w:
                run([gzbin, str(level)], stdin=r, stdout=w)
            blobs.append(gp)
        image = os.path.join(args.work, f"image-{label}.tar")
        with tarfile.open(image, "w", format=tarfile.PAX_FORMAT) as t:
            for gp in blobs:
                t.add(gp, arcname="blobs/sha256/" + sha256_file(gp))
        store = os.path.join(args.work, f"store-{label}")
        run([args.wharf, "--quiet", "--store", store, "init"], capture_output=True)
        t0 = time.monotonic()
        run([args.wharf, "--quiet", "--store", store, "add", image, "--name", "go", "--json"], capture_output=True)
        add_s = time.monotonic() - t0
        info = json.loads(run([args.wharf, "--quiet", "--store", store, "info", "go", "--json"],
                              capture_output=True, text=True).stdout)
        out = os.path.join(args.work, "out.tar")
        t0 = time.monotonic()
        run([args.wharf, "--quiet", "--store", store, "extract", "go", "-o", out], capture_output=True)
        extract_s = time.monotonic() - t0
        same = sha256_file(out) == sha256_file(image)
        os.remove(out)
        per_layer = []
        for layer in info["layers"]:
            c = layer.get("compression")
            if not c:
                continue
            per_layer.append({"compressed": layer["len"], "method": c["method"],
                              "recon": c.get("recon_len"), "plain": c.get("plain_len"),
                              "reason": c.get("reason")})
        rows.append({"level": label, "go_level": level, "layers": per_layer, "add_s": add_s,
                     "extract_s": extract_s, "image_bytes": os.path.getsize(image),
                     "byte_identical": same})
        shutil.rmtree(store)
    res = {"generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "go": go_version,
           "source": os.path.relpath(src, args.corpus), "command": "python3 benches/go_gzip.py", "rows": rows}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    for r in rows:
        comp = sum(x["compressed"] for x in r["layers"])
        recon = sum(x["recon"] or 0 for x in r["layers"])
        methods = ", ".join(sorted({x["method"] for x in r["layers"]}))
        print(f"{r['level']}: {len(r['layers'])} layers, {comp / 1e6:.1f} MB compressed, methods {methods}, "
              f"recon {recon:,} B ({100 * recon / comp:.2f} %), add {r['add_s']:.1f} s, "
              f"extract {r['extract_s']:.1f} s, byte-identical {r['byte_identical']}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
