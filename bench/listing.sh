#!/usr/bin/env bash
# Listing benchmark of bucketfs (issue 13): directories of 10k, 100k and 1M empty files on the
# local disk, listed through a read-only `file://` mount with `ls -f | wc -l` and `ls -l`, a
# fresh mount and a dropped page cache for each; prints seconds, time per entry and the
# daemon's peak RSS, writes bench/results/listing.json (--out-dir to change).
#
#   ./bench/listing.sh                          # 10k, 100k, 1M: about 15 minutes here
#   ./bench/listing.sh --sizes 10k,100k         # about a minute
#   ./bench/listing.sh --bucketfs-args "--metadata-ttl 1h"
#
# Options of this script (everything else goes to bench/listing.py; see --help), the same as
# bench/run.sh's:
#   --no-install   do not install fuse3
#   --no-build     use the bucketfs already built (in $CARGO_TARGET_DIR/release, default
#                  target/release)
# Environment: CARGO_TARGET_DIR, BUCKETFS_BENCH_TMP (where the directories are made, default
# $TMPDIR or /tmp, on a local disk: 1M empty files take about 1M inodes and 4 GiB of metadata
# blocks at most; they are deleted after each size, also on failure).
set -euo pipefail

# bench/run.sh does the installing, building and argument handling for both benchmarks.
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" --listing "$@"
