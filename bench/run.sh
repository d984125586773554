#!/usr/bin/env bash
# Model-loading benchmark of bucketfs: one command, prints the tables and writes
# bench/results/latest.json, latest.png and latest-cache-write.png.
#
#   ./bench/run.sh                                   # 2 GiB model, 3 runs, no added latency
#   ./bench/run.sh --latency-ms 0,25                 # the full run (~26 min on 2 CPUs)
#   ./bench/run.sh --model-size 256MiB --write-size 512MiB --runs 1 --latency-ms 0,25
#   ./bench/run.sh --bucketfs-args "--read-concurrency 16"
#
# It installs what it needs (fuse3, SeaweedFS, s3fs, rclone from apt; the Python packages of
# bench/requirements.txt into a virtualenv), builds bucketfs and the helper examples
# (delay_proxy, direct_download, direct_upload), starts the local S3 server, runs bench/bench.py,
# and always cleans up: unmounts, stops every process it started, deletes the data.
#
# Options of this script (everything else goes to bench.py; see --help):
#   --no-install   do not install packages (they must be there)
#   --no-build     use the binaries already in target/release
# Environment: BUCKETFS_BENCH_VENV (virtualenv path), BUCKETFS_BENCH_TMP (where the scratch
# directory goes, default $TMPDIR or /tmp, on a local disk; it needs about 4x the model size
# plus 2x the write size free).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

install=1
build=1
bench_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-install) install=0 ;;
        --no-build) build=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            echo
            python3 bench/bench.py --help | sed -n '/^options:/,$p'
            exit 0
            ;;
        --bucketfs-args)
            # Its value starts with "--": hand it over as one --opt=value word.
            [[ $# -ge 2 ]] || { echo "run.sh: --bucketfs-args needs a value" >&2; exit 2; }
            bench_args+=("--bucketfs-args=$2")
            shift
            ;;
        *) bench_args+=("$1") ;;
    esac
    shift
done

log() { printf '[run.sh] %s\n' "$*" >&2; }

# shellcheck source=scripts/servers.sh
source scripts/servers.sh

venv="${BUCKETFS_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bucketfs-bench/venv}"

install_deps() {
    bucketfs_install_deps
    if ! command -v s3fs >/dev/null || ! command -v rclone >/dev/null; then
        log "installing s3fs and rclone (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq s3fs rclone >/dev/null
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating the virtualenv $venv"
        mkdir -p "$(dirname "$venv")"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            rm -rf "$venv"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv "$venv"
        fi
    fi
    if ! cmp -s bench/requirements.txt "$venv/.bench-requirements"; then
        log "installing bench/requirements.txt into the virtualenv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            -r bench/requirements.txt
        cp bench/requirements.txt "$venv/.bench-requirements"
    fi
}

if [[ $install -eq 1 ]]; then
    install_deps
fi
if [[ ! -x "$venv/bin/python" ]]; then
    log "no virtualenv at $venv: run without --no-install once"
    exit 1
fi
if [[ $build -eq 1 ]]; then
    log "building bucketfs and the bench examples (release)"
    cargo build --release --locked --bin bucketfs --example delay_proxy --example direct_download \
        --example direct_upload
fi

work="$(mktemp -d "${BUCKETFS_BENCH_TMP:-${TMPDIR:-/tmp}}/bucketfs-bench.XXXXXX")"
bench_pid=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n "$bench_pid" ]] && kill -0 "$bench_pid" 2>/dev/null; then
        kill -TERM "$bench_pid" 2>/dev/null
        wait "$bench_pid" 2>/dev/null
    fi
    # Whatever bench.py could not stop itself (it lists its live processes in $work/pids).
    local pid
    if [[ -f "$work/pids" ]]; then
        while read -r pid; do
            [[ "$pid" =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null
        done <"$work/pids"
    fi
    local mp
    while read -r _ _ _ _ mp _; do
        mp="$(printf '%b' "${mp//\\/\\0}")"
        if [[ "$mp" == "$work"/* ]]; then
            log "unmounting leftover $mp"
            umount -l "$mp" 2>/dev/null || fusermount3 -uz "$mp" 2>/dev/null
        fi
    done </proc/self/mountinfo
    bucketfs_stop_servers
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bucketfs_start_servers

command_line="./bench/run.sh"
for a in "${bench_args[@]}"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then
        command_line+=" $a"
    else
        command_line+=" $(printf '%q' "$a")"
    fi
done
export BUCKETFS_BENCH_COMMAND="$command_line"

# In the background, so that a signal to this script is handled at once (cleanup stops it).
"$venv/bin/python" bench/bench.py --workdir "$work" --bin-dir "$repo/target/release" \
    "${bench_args[@]}" &
bench_pid=$!
wait "$bench_pid"
