#!/usr/bin/env bash
# A private Docker engine for cli/tests/docker.rs, started and stopped by PID.
#
#   eval "$(.ci/dockerd.sh start DIR)"   # prints `export ...` lines for the tests
#   .ci/dockerd.sh stop DIR              # stops the engine started in DIR, removes DIR
#
# start installs Debian's docker.io and busybox-static when they are missing
# (as root, with apt-get), runs dockerd as root with vfs storage, no networking
# setup and everything under DIR, waits until it answers, and prints
#   export WHARF_DOCKER_HOST=unix://DIR/docker.sock
# Where the engine cannot run (not root, nothing to install it with, dockerd
# fails to start) it prints
#   export WHARF_DOCKER_SKIP='<reason>'
# instead and still exits 0: the docker tests then each print `SKIPPED: <reason>`.
# Messages go to stderr; stdout carries only the export lines.
set -uo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi

skip() {
    echo "ci: docker engine unavailable, the docker tests will be SKIPPED: $1" >&2
    printf 'export WHARF_DOCKER_SKIP=%q\n' "$1"
    exit 0
}

install_pkgs() {
    command -v apt-get >/dev/null 2>&1 || return 1
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq "$@"; } >"$dir/apt.log" 2>&1
}

start() {
    mkdir -p "$dir" || skip "cannot create $dir"
    [ "$(id -u)" = 0 ] || skip "dockerd needs root and this is uid $(id -u)"
    local want=()
    command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
    # The tests build their base image from a static busybox.
    dpkg -s busybox-static >/dev/null 2>&1 || want+=(busybox-static)
    if [ ${#want[@]} -gt 0 ]; then
        echo "ci: installing ${want[*]}" >&2
        install_pkgs "${want[@]}" || skip "could not install ${want[*]} ($(tail -n 3 "$dir/apt.log" 2>/dev/null | tr '\n' ' '))"
    fi
    command -v dockerd >/dev/null 2>&1 || skip "dockerd is not on PATH after installing docker.io"
    command -v docker >/dev/null 2>&1 || skip "the docker client is not on PATH"
    mkdir -p "$dir/data" "$dir/exec"
    local sock="$dir/docker.sock"
    # setsid: the engine must not get the terminal's signals meant for the tests.
    setsid dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
        --data-root "$dir/data" --exec-root "$dir/exec" -H "unix://$sock" \
        --pidfile "$dir/dockerd.pid" </dev/null >"$dir/dockerd.log" 2>&1 &
    local launched=$!
    echo "$launched" >"$dir/launched.pid"
    local i
    for i in $(seq 1 300); do
        if DOCKER_HOST="unix://$sock" docker version >/dev/null 2>&1; then
            echo "ci: dockerd $(cat "$dir/dockerd.pid" 2>/dev/null) ready at unix://$sock after $((i / 10)).$((i % 10)) s" >&2
            printf 'export WHARF_DOCKER_HOST=%q\n' "unix://$sock"
            return 0
        fi
        if ! kill -0 "$launched" 2>/dev/null; then
            skip "dockerd exited at start: $(tail -n 3 "$dir/dockerd.log" | tr '\n' ' ')"
        fi
        sleep 0.1
    done
    stop_engine
    skip "dockerd did not answer within 30 s: $(tail -n 3 "$dir/dockerd.log" | tr '\n' ' ')"
}

# Stops the engine this script started in $dir (by its PID files only).
stop_engine() {
    local pid=""
    [ -s "$dir/dockerd.pid" ] && pid=$(cat "$dir/dockerd.pid")
    [ -z "$pid" ] && [ -s "$dir/launched.pid" ] && pid=$(cat "$dir/launched.pid")
    [ -n "$pid" ] || return 0
    local containerd=""
    [ -s "$dir/exec/containerd/containerd.pid" ] && containerd=$(cat "$dir/exec/containerd/containerd.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        local i
        for i in $(seq 1 200); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "ci: dockerd $pid ignored SIGTERM for 20 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    # dockerd stops the containerd it started; after a SIGKILL it cannot.
    if [ -n "$containerd" ] && kill -0 "$containerd" 2>/dev/null; then
        kill -KILL "$containerd" 2>/dev/null
    fi
    # dockerd bind-mounts its data root onto itself.
    if mountpoint -q "$dir/data" 2>/dev/null; then
        umount "$dir/data" 2>/dev/null || umount -l "$dir/data" 2>/dev/null
    fi
    echo "ci: dockerd $pid stopped" >&2
}

case "$cmd" in
start) start ;;
stop)
    [ -d "$dir" ] || exit 0
    stop_engine
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
