#!/bin/sh
# Sums cargo's per-binary "test result:" lines into one closing line: "tests: N passed, N failed, N skipped".
# Exits non-zero when no test ran at all, so an empty run can never pass silently.
set -eu
log=${1:?usage: $0 CARGO_TEST_LOG}
awk '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/)  passed  += $(i - 1)
            if ($(i) ~ /^failed;?$/)  failed  += $(i - 1)
            if ($(i) ~ /^ignored;?$/) ignored += $(i - 1)
        }
        binaries++
    }
    END {
        printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored
        if (binaries == 0 || passed == 0) { print "no test ran" > "/dev/stderr"; exit 1 }
        if (failed > 0) exit 1
    }
' "$log"
