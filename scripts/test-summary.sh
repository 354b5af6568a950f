#!/bin/sh
# Sums cargo's per-binary "test result:" lines into one closing line: "tests: N passed, N failed, N skipped".
#
# usage: test-summary.sh CARGO_TEST_LOG [SKIP_LOG]
#
# libtest has no runtime skip: a test that cannot run here calls rm_e2e::skip, which appends
# "<test binary>::<test name><TAB><reason>" to SKIP_LOG (default: $RM_SKIP_LOG, else test-skips.log next to the cargo
# log) and returns, so libtest counts it as passed. Those tests are moved from passed to skipped and listed with their
# reasons; #[ignore]d tests count as skipped too. The closing line is always the last line printed.
# Exits non-zero when a test failed, when no test passed (an empty run can never pass silently), or when anything
# was skipped under CI (CI set, non-empty and not "false"), where every test must run.
set -eu
log=${1:?usage: $0 CARGO_TEST_LOG [SKIP_LOG]}
skips=${2:-${RM_SKIP_LOG:-$(dirname "$log")/test-skips.log}}
[ -r "$skips" ] || skips=/dev/null
case ${CI:-} in '' | false) ci=0 ;; *) ci=1 ;; esac
awk -v ci="$ci" -v skips="$skips" '
    function err(msg) { fflush(); printf "test-summary: %s\n", msg > "/dev/stderr"; fflush("/dev/stderr"); bad = 1 }
    BEGIN {
        while ((getline line < skips) > 0) {
            tab = index(line, "\t")
            if (tab == 0) continue
            id = substr(line, 1, tab - 1)
            if (!(id in reason)) { order[++n] = id; reason[id] = substr(line, tab + 1) }
        }
    }
    # "Running tests/x.rs (target/debug/deps/x-0123abcd)": the binary the following results belong to.
    /^ *Running / {
        binary = $0
        sub(/^.*\//, "", binary); sub(/\)[ \t\r]*$/, "", binary); sub(/-[0-9a-f]+$/, "", binary)
    }
    /^test .* \.\.\. FAILED/ { name = $0; sub(/^test /, "", name); sub(/ \.\.\. FAILED.*$/, "", name); failed_test[binary "::" name] = 1 }
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/)  passed  += $(i - 1)
            if ($(i) ~ /^failed;?$/)  failed  += $(i - 1)
            if ($(i) ~ /^ignored;?$/) ignored += $(i - 1)
        }
        binaries++
    }
    END {
        moved = 0
        for (k = 1; k <= n; k++) if (!(order[k] in failed_test)) moved++  # failed after the skip: stays a failure
        if (moved > passed) {
            err(sprintf("the skip log %s lists %d skipped tests but only %d passed: is it stale?", skips, moved, passed))
            moved = 0
        }
        for (k = 1; k <= n && moved > 0; k++)
            if (!(order[k] in failed_test)) printf "skipped: %s: %s\n", order[k], reason[order[k]]
        passed -= moved
        if (binaries == 0 || passed == 0) err("no test ran")
        if (failed > 0) bad = 1
        if (ci && moved > 0) err(sprintf("%d test(s) skipped under CI, where every test must run", moved))
        fflush()
        printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored + moved
        exit bad
    }
' "$log"
