#!/usr/bin/env bash
# Fuzzes every target in fuzz/fuzz_targets/ for a short time (the test command's fuzz step).
#
#   bash scripts/fuzz.sh            # FUZZ_SECONDS=30 per target, FUZZ_JOBS=nproc at once
#
# 1. `cargo check` of the fuzz crate (all its bins), with the ordinary flags.
# 2. Builds every target found by globbing fuzz/fuzz_targets/*.rs (a new file needs its
#    [[bin]] in fuzz/Cargo.toml, else the build names it) with the flags `cargo fuzz build -a`
#    passes -- no cargo-fuzz install needed: SanitizerCoverage (inline 8-bit counters, PC table,
#    compare tracing, stack depth), AddressSanitizer, `--cfg fuzzing`, debug assertions, one
#    codegen unit, line tables for the reports -- for the host triple named explicitly, so build scripts and proc macros are
#    built without them. RUSTC_BOOTSTRAP=1 lets the stable toolchain take -Zsanitizer. Its own
#    target dir keeps the main build's cache intact: $KVT_FUZZ_TARGET_DIR, by default
#    ~/.cache/kvtransfer/fuzz-target, shared by every checkout of this machine so that a fresh
#    clone does not rebuild the instrumented dependencies (about 4 minutes on 2 cores); it is
#    only a build cache, rebuilt by cargo whenever it is missing or stale.
# 3. Runs each target for FUZZ_SECONDS (-max_total_time) on its corpus fuzz/corpus/<target>
#    (kept between runs, ignored by git); a crash, leak, timeout or failed assertion fails the
#    script, with the input saved under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TERM_COLOR=never

secs=${FUZZ_SECONDS:-30}
jobs=${FUZZ_JOBS:-$(nproc)}
# -max_total_time=0 would mean "no limit".
[[ $secs =~ ^[1-9][0-9]*$ && $jobs =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: FUZZ_SECONDS and FUZZ_JOBS must be positive integers" >&2; exit 2; }
manifest=fuzz/Cargo.toml
export CARGO_TARGET_DIR=${KVT_FUZZ_TARGET_DIR:-$HOME/.cache/kvtransfer/fuzz-target}
mkdir -p "$CARGO_TARGET_DIR"
triple=$(rustc -vV | sed -n 's/^host: //p')
say() { echo "fuzz: $*" >&2; }

targets=()
for f in fuzz/fuzz_targets/*.rs; do
  [ -e "$f" ] && targets+=("$(basename "$f" .rs)")
done
[ ${#targets[@]} -gt 0 ] || { say "no targets in fuzz/fuzz_targets"; exit 1; }

say "cargo check --bins"
cargo check --quiet --manifest-path "$manifest" --bins

# An instrumented binary is about 230 MB and each changed build leaves the last one behind: a
# filling disk makes the linker die of SIGBUS, so say how much room there is when it is short.
free_kib=$(df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 { print $4 }')
if [ "${free_kib:-0}" -lt $((4 * 1024 * 1024)) ]; then
  say "warning: only $((free_kib / 1024)) MiB free under $CARGO_TARGET_DIR; the build needs about 3 GiB"
fi

bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
say "building ${targets[*]} for $triple"
RUSTC_BOOTSTRAP=1 \
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
--cfg fuzzing -Clink-dead-code -Zsanitizer=address -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Ccodegen-units=1" \
  cargo build --quiet --manifest-path "$manifest" --target "$triple" --release \
    --config 'profile.release.debug="line-tables-only"' "${bins[@]}"

# Drop the binaries of earlier builds: keep, per target, the deps/ file that the uplifted
# release/<target> is a hard link of (when none is, it was copied, and nothing is removed).
deps=$CARGO_TARGET_DIR/$triple/release/deps
for t in "${targets[@]}"; do
  current=$(stat -c %i "$CARGO_TARGET_DIR/$triple/release/$t")
  keep=
  for f in "$deps/$t"-*; do
    [ -f "$f" ] && [ "$(stat -c %i "$f")" = "$current" ] && keep=$(basename "$f")
  done
  [ -n "$keep" ] || continue
  for f in "$deps/$t"-*; do
    case $(basename "$f") in "$keep" | "$keep".d) ;; *) rm -f "$f" ;; esac
  done
done

logs=$(mktemp -d)
declare -A pid_of=() # target -> pid of its running fuzzer
stop() {
  [ ${#pid_of[@]} -eq 0 ] || kill "${pid_of[@]}" 2>/dev/null || true
  rm -rf "$logs"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0

run_target() { # in a background subshell, which the fuzzer replaces (so its pid is the fuzzer's)
  local t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  exec "$CARGO_TARGET_DIR/$triple/release/$t" -max_total_time="$secs" -timeout=10 \
    -artifact_prefix="fuzz/artifacts/$t/" "fuzz/corpus/$t" >"$logs/$t.log" 2>&1
}

say "running each target for $secs s, $jobs at a time"
failed=()
finish() { # reaps one target; its status decides
  local pid rc=0 t
  wait -n -p pid || rc=$?
  for t in "${!pid_of[@]}"; do
    [ "${pid_of[$t]}" = "$pid" ] || continue
    unset "pid_of[$t]"
    # libFuzzer's closing line: "Done N runs in S second(s)"; the last status line has cov/corp.
    local done_line stats
    done_line=$(grep -a '^Done [0-9]* runs' "$logs/$t.log" | tail -n 1 || true)
    stats=$(grep -a '^#[0-9]' "$logs/$t.log" | tail -n 1 | grep -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*/[^ ]*' || true)
    if [ "$rc" -ne 0 ] || [ -z "$done_line" ]; then
      say "$t FAILED (exit $rc); the end of its log:"
      tail -n 40 "$logs/$t.log" >&2
      failed+=("$t")
    else
      say "$t ok: $done_line; $stats"
    fi
  done
}
for t in "${targets[@]}"; do
  [ ${#pid_of[@]} -lt "$jobs" ] || finish
  run_target "$t" &
  pid_of[$t]=$!
done
while [ ${#pid_of[@]} -gt 0 ]; do finish; done

if [ ${#failed[@]} -gt 0 ]; then
  say "failed: ${failed[*]} (inputs under fuzz/artifacts/)"
  exit 1
fi
say "${#targets[@]} targets, $secs s each: no crash"
