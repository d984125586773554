#!/usr/bin/env bash
# The main job on the embedded default: build bucketfs, make a sample "bucket"
# (a local directory), mount it read-only in the background, list and read it, unmount.
# Needs no cloud account. Run as root on Debian (or as a user with fuse3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -d "${CARGO_HOME:-$HOME/.cargo}/bin" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
# shellcheck source=scripts/servers.sh
source scripts/servers.sh
bucketfs_install_fuse

cargo build --release --locked
bin=target/release/bucketfs

work="$(mktemp -d)"
# Unmounting ends the daemon: root uses umount, other users the fuse3 helper.
unmount() {
    if [[ $EUID -eq 0 ]]; then umount "$1"; else fusermount3 -u "$1"; fi
}
# Whether a bucketfs daemon serving $1 still runs (no procps needed).
daemon_runs() {
    local f
    for f in /proc/[0-9]*/cmdline; do
        tr '\0' ' ' 2>/dev/null <"$f" | grep -qF -- "mount file://$1 " && return 0
    done
    return 1
}
cleanup() {
    if mountpoint -q "$work/mnt" 2>/dev/null; then
        unmount "$work/mnt" || umount -l "$work/mnt" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

bucket="$work/bucket"
mnt="$work/mnt"
mkdir -p "$bucket/models/tiny" "$bucket/datasets/shards" "$mnt"
printf '{"model_type": "tiny", "hidden_size": 64}\n' >"$bucket/models/tiny/config.json"
head -c $((8 << 20)) /dev/urandom >"$bucket/models/tiny/model.safetensors"
for i in 0 1 2; do
    printf 'sample %s\n' "$i" >"$bucket/datasets/shards/shard-$i.txt"
done

echo "== bucketfs mount file://$bucket $mnt --read-only"
# Returns once the mount answers; the daemon serves it from the background.
"$bin" mount "file://$bucket" "$mnt" --read-only --log-level warn --log-file "$work/bucketfs.log"
mountpoint -q "$mnt" || { echo "not mounted" >&2; exit 1; }

echo "== ls -lR"
ls -lR "$mnt"
echo "== cat models/tiny/config.json"
cat "$mnt/models/tiny/config.json"
echo "== checksum through the mount vs the source"
a="$(sha256sum <"$mnt/models/tiny/model.safetensors")"
b="$(sha256sum <"$bucket/models/tiny/model.safetensors")"
echo "mount:  $a"
echo "source: $b"
[[ "$a" == "$b" ]] || { echo "MISMATCH" >&2; exit 1; }

echo "== umount (the daemon finishes its uploads and exits)"
unmount "$mnt"
mountpoint -q "$mnt" && { echo "still mounted" >&2; exit 1; }
for _ in $(seq 100); do
    daemon_runs "$bucket" || break
    sleep 0.1
done
daemon_runs "$bucket" && { echo "the daemon did not exit" >&2; exit 1; }
echo "ok: mounted, listed, read byte-exact, unmounted"
