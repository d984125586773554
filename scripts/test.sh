#!/usr/bin/env bash
# The test command: installs what the tests need, starts the S3 (SeaweedFS)
# and GCS (fake-gcs-server) test servers on free loopback ports, runs
# `cargo test`, and stops the servers again, also on failure or interrupt.
#
#   ./scripts/test.sh                      # cargo fmt --check, clippy -D warnings, then
#                                          # cargo test --locked --all-targets --no-fail-fast -- --test-threads=4
#   ./scripts/test.sh --test s3 -- foo     # cargo test --locked --test s3 -- foo
#
# Arguments are passed to `cargo test` (default: --all-targets). Without a
# `--` among them, `-- --test-threads=$RUST_TEST_THREADS` (default 4) is added.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -d "${CARGO_HOME:-$HOME/.cargo}/bin" ]]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
# A test run builds once from scratch (CI): incremental state only costs time and disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The whole run (what CI runs) first holds the code to its style gates.
if [[ $# -eq 0 ]]; then
    cargo fmt --all -- --check
    cargo clippy --locked --all-targets -- -D warnings
fi

# shellcheck source=scripts/servers.sh
source scripts/servers.sh

bucketfs_install_deps

trap bucketfs_stop_servers EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bucketfs_start_servers

if [[ $# -eq 0 ]]; then
    # Every test file runs even after one fails, so a run reports all failures at once.
    set -- --all-targets --no-fail-fast
fi
has_separator=0
for arg in "$@"; do
    if [[ "$arg" == "--" ]]; then
        has_separator=1
        break
    fi
done
if [[ $has_separator -eq 0 ]]; then
    set -- "$@" -- --test-threads="$RUST_TEST_THREADS"
fi

status=0
cargo test --locked "$@" || status=$?
exit "$status"
