#!/usr/bin/env bash
# Runs the POSIX file system test suite pjdfstest 0.2.2 (the Rust port of the
# FreeBSD/ZFS suite, 398 tests) on writable bucketfs mounts of a local
# directory (file://), an S3 bucket (s3://, the SeaweedFS test server) and a GCS
# bucket (gs://, fake-gcs-server), each with --allow-other, and prints ok /
# failed / skipped per area (syscall) and in total for each.
#
#   ./scripts/posix.sh               # all three backends
#   ./scripts/posix.sh file s3       # some of them
#
# Needs root (pjdfstest switches users, chowns, makes device nodes). Installs
# pjdfstest with cargo, and the test servers as scripts/test.sh does. The full
# output of each run is kept in target/posix/BACKEND.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -d "${CARGO_HOME:-$HOME/.cargo}/bin" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "posix.sh: run as root (pjdfstest switches users and changes owners)" >&2
    exit 2
fi

backends=("$@")
[[ ${#backends[@]} -eq 0 ]] && backends=(file s3 gs)

# shellcheck source=scripts/servers.sh
source scripts/servers.sh
bucketfs_install_deps

if ! command -v pjdfstest >/dev/null 2>&1; then
    echo "posix.sh: installing pjdfstest 0.2.2" >&2
    cargo install pjdfstest --version 0.2.2 --locked
fi
# The second user and group the suite switches to.
getent group tests >/dev/null || groupadd tests
getent passwd tests >/dev/null || useradd -g tests -M -s /usr/sbin/nologin tests
nobody_group=$(id -gn nobody)

cargo build --locked --bin bucketfs
bin="${CARGO_TARGET_DIR:-target}/debug/bucketfs"
out="${CARGO_TARGET_DIR:-target}/posix"
mkdir -p "$out"

trap bucketfs_stop_servers EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bucketfs_start_servers

work=$(mktemp -d)
cat >"$work/pjdfstest.toml" <<EOF
# utimensat(2) is supported (times are kept with nanoseconds).
[features]
utimensat = {}

[settings]
# Times are kept with nanoseconds (in the metadata on buckets).
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [["nobody", "$nobody_group"], ["tests", "tests"]]
EOF

# A fresh bucket on the test servers, through their S3 and JSON APIs.
new_bucket() {
    local name="posix-$1-$$-$RANDOM"
    case "$1" in
    s3)
        python3 - "$BUCKETFS_TEST_S3_ENDPOINT" "$name" <<'PY'
import sys, urllib.request, hmac, hashlib, datetime, os
endpoint, bucket = sys.argv[1], sys.argv[2]
# SeaweedFS in the tests accepts this static key pair (see servers.sh); sign SigV4.
key, secret, region = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ.get("AWS_REGION", "us-east-1")
host = endpoint.split("://", 1)[1].rstrip("/")
t = datetime.datetime.now(datetime.timezone.utc)
amz, day = t.strftime("%Y%m%dT%H%M%SZ"), t.strftime("%Y%m%d")
payload = hashlib.sha256(b"").hexdigest()
canon = f"PUT\n/{bucket}\n\nhost:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload}"
scope = f"{day}/{region}/s3/aws4_request"
sts = f"AWS4-HMAC-SHA256\n{amz}\n{scope}\n{hashlib.sha256(canon.encode()).hexdigest()}"
k = ("AWS4" + secret).encode()
for part in (day, region, "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
req = urllib.request.Request(f"{endpoint.rstrip('/')}/{bucket}", method="PUT", headers={
    "x-amz-date": amz, "x-amz-content-sha256": payload,
    "Authorization": f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}"})
urllib.request.urlopen(req).read()
PY
        ;;
    gs)
        curl -fsS -X POST -H 'Content-Type: application/json' \
            -d "{\"name\": \"$name\"}" "$BUCKETFS_TEST_GCS_ENDPOINT/storage/v1/b?project=test" >/dev/null
        ;;
    esac
    echo "$name"
}

run_one() {
    local backend=$1 source mnt log pid
    mnt="$work/mnt-$backend"
    mkdir -p "$mnt"
    local -a env=(BUCKETFS_LOG_LEVEL=warn)
    case "$backend" in
    file)
        # A root path no longer than the mount point's: the suite makes paths of PATH_MAX - 1
        # bytes through the mount, which must fit under the root too.
        mkdir -p "$work/r"
        source="file://$work/r"
        ;;
    s3)
        source="s3://$(new_bucket s3)"
        env+=(BUCKETFS_ENDPOINT_URL="$BUCKETFS_TEST_S3_ENDPOINT" BUCKETFS_FORCE_PATH_STYLE=true)
        ;;
    gs)
        source="gs://$(new_bucket gs)"
        env+=(BUCKETFS_ENDPOINT_URL="$BUCKETFS_TEST_GCS_ENDPOINT" BUCKETFS_ANONYMOUS=true)
        ;;
    *)
        echo "posix.sh: unknown backend $backend (file, s3 or gs)" >&2
        return 2
        ;;
    esac
    env "${env[@]}" "$bin" mount "$source" "$mnt" --allow-other --metadata-ttl 0 \
        2>"$out/$backend.daemon.log" &
    pid=$!
    for _ in $(seq 100); do
        mountpoint -q "$mnt" && break
        sleep 0.1
    done
    mountpoint -q "$mnt" || { echo "posix.sh: $source did not mount" >&2; return 1; }
    mkdir "$mnt/pjd"
    log="$out/$backend.log"
    # pjdfstest's exit status says whether anything failed; the summary is what we want.
    (cd "$mnt/pjd" && timeout 1800 pjdfstest -c "$work/pjdfstest.toml" -p "$mnt/pjd") >"$log" 2>&1 || true
    if kill -0 "$pid" 2>/dev/null; then
        daemon="alive"
    else
        daemon="DEAD"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "== $backend ($source): daemon $daemon after the suite"
    summarize "$log"
}

# Per area (the syscall before `::`): ok, failed, skipped; then the totals.
summarize() {
    awk '
        $1 ~ /::/ && ($NF == "ok" || $NF == "FAILED" || $NF == "skipped") {
            split($1, name, "::"); area = name[1]
            r = ($NF == "ok") ? "ok" : ($NF == "FAILED") ? "failed" : "skipped"
            n[area, r]++; areas[area] = 1; total[r]++
        }
        END {
            printf "%-14s %4s %6s %7s\n", "area", "ok", "failed", "skipped"
            for (a in areas) printf "%-14s %4d %6d %7d\n", a, n[a, "ok"], n[a, "failed"], n[a, "skipped"] | "sort"
            close("sort")
            printf "%-14s %4d %6d %7d\n", "TOTAL", total["ok"], total["failed"], total["skipped"]
        }' "$1"
    grep '^Summary:' "$1" || echo "(no summary: the suite did not finish)"
}

for b in "${backends[@]}"; do
    run_one "$b"
done
