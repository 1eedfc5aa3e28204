#!/usr/bin/env bash
# Runs the appcode fuzz targets (appcode/fuzz) for SECONDS each (default 60):
#   load          any bytes as an ELF object
#   verify        any bytes as a file, an argument and an instruction stream; whatever is
#                 accepted runs on the checked engine, where it must never fault, and on
#                 rbpf's interpreter, which must agree
#   differential  generated programs that verify often: checked engine against interpreter
#   server        (nbd/fuzz) any bytes from a client to the NBD server, in the handshake or
#                 after a valid one; it must answer or close, and serve the next client
# Seeds come from the bpf-progs examples and the hostile corpus. Needs cargo-fuzz
# (cargo install cargo-fuzz); on a stable toolchain RUSTC_BOOTSTRAP lets it pass its
# nightly flags, and sanitizers stay off (-s none).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
corpus=appcode/fuzz/corpus
mkdir -p "$corpus/load" "$corpus/verify" "$corpus/differential"
for c in bpf-progs/*.c appcode/tests/hostile/*.c; do
    name=$(basename "$c" .c)
    clang -O2 -g -target bpf -mcpu=v3 -I bpf-progs/include -c "$c" -o "$corpus/load/$name.o"
    # The program section's bytes seed the verifier, after a 4 KiB file of pattern bytes and
    # a 16-byte argument (the target's input: file length, argument length, file, argument,
    # program).
    if llvm-objcopy -O binary --only-section="nearfs/*" "$corpus/load/$name.o" "$corpus/verify/$name.code" 2>/dev/null; then
        {
            printf '\x00\x10\x10\x00'
            head -c 4096 /dev/zero | tr '\0' '\7'
            printf '\x07\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\x7f'
            cat "$corpus/verify/$name.code"
        } >"$corpus/verify/$name.bin"
        rm "$corpus/verify/$name.code"
    fi
done
cd appcode/fuzz
cargo fuzz build -s none
for target in load verify differential; do
    echo "== $target: ${seconds}s"
    cargo fuzz run -s none "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 2>&1 |
        grep -E "^(stat::|#[0-9]+ *DONE|==|SUMMARY|Done)" || true
done

# The NBD server: seeds are a handshake, and requests after a valid handshake (mode byte 1):
# a read, a write with its payload, a flush, and an appcode RUN that names no program.
cd ../../nbd/fuzz
mkdir -p corpus/server
req() { printf '\x25\x60\x95\x13'; printf "$1"; }
{ printf '\x00\x00\x00\x00\x03'; printf 'IHAVEOPT\x00\x00\x00\x03\x00\x00\x00\x00'; } >corpus/server/list
{ printf '\x01'; req '\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00'; } >corpus/server/read
{ printf '\x01'; req '\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x08'; printf 'abcdefgh'; req '\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00'; } >corpus/server/write
{ printf '\x01'; req '\x00\x00\x4e\x41\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x58'; head -c 88 /dev/zero; } >corpus/server/run
cargo fuzz build -s none
echo "== server: ${seconds}s"
cargo fuzz run -s none server corpus/server -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 2>&1 |
    grep -E "^(stat::|#[0-9]+ *DONE|==|SUMMARY|Done)" || true
