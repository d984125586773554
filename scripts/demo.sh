#!/usr/bin/env bash
# The main job on the embedded default: build bucketfs, make a sample "bucket"
# (a local directory), mount it read-only, list and read it, unmount.
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
pid=""
cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" || true
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
"$bin" mount "file://$bucket" "$mnt" --read-only --log-level warn &
pid=$!
for _ in $(seq 100); do
    mountpoint -q "$mnt" && break
    sleep 0.1
done
mountpoint -q "$mnt" || { echo "mount did not come up" >&2; exit 1; }

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

echo "== unmount (SIGTERM)"
kill -TERM "$pid"
wait "$pid"
pid=""
mountpoint -q "$mnt" && { echo "still mounted" >&2; exit 1; }
echo "ok: mounted, listed, read byte-exact, unmounted"
