#!/usr/bin/env bash
# Garage, the S3-compatible store the object-store tests (objstore/tests/garage.rs,
# cli/tests/s3.rs) and the benchmark's object-store section run a 3-node cluster of.
# One recipe and one version for both, so that they build it once between them.
#
#   .ci/garage.sh path    # prints where the cached binary is (or would be)
#   .ci/garage.sh build   # builds it there when missing, then prints its path;
#                         # exits 1 (saying why on stderr) when the build fails
#
# Built from crates.io (8-11 minutes on two cores, once), cached in
# ${WHARF_CI_CACHE:-~/.cache/wharf-ci}, which survives between CI runs on a machine
# that keeps $HOME. Messages go to stderr; stdout carries only the path.
set -uo pipefail

version=2.5.0
root="${WHARF_CI_CACHE:-$HOME/.cache/wharf-ci}/garage-$version"
bin="$root/bin/garage"

case "${1:-}" in
path) ;;
build)
    if [ ! -x "$bin" ]; then
        echo "== building garage $version (cached in $root) ($(date -u +%H:%M:%S))" >&2
        target=$(mktemp -d /tmp/wharf-garage-build.XXXXXX)
        # opt-level 1 and no debug info: about half the compile time of a full
        # release build, and fast enough for clusters that hold a few MB.
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
            cargo install garage --version "$version" --locked --quiet \
            --no-default-features --features bundled-libs,lmdb \
            --root "$root" --target-dir "$target" >&2
        status=$?
        rm -rf "$target"
        if [ $status -ne 0 ] || [ ! -x "$bin" ]; then
            echo "garage: cargo install garage $version failed (status $status)" >&2
            exit 1
        fi
    fi
    ;;
*)
    echo "usage: $0 path|build" >&2
    exit 2
    ;;
esac
echo "$bin"
