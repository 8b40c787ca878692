#!/usr/bin/env bash
# Runs the README's demo command exactly as written, follows the
# instructions it prints (sign up, pair, switch on), and checks that Ctrl-C
# stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

demo_cmd=$(awk '/^## Set-up/{s=1} s&&/^```sh/{c=1;next} c&&/^```/{exit} c' README.md | sed -n 1p)
test_cmd=$(awk '/^## Set-up/{s=1} s&&/^```sh/{c=1;next} c&&/^```/{exit} c' README.md | sed -n 2p)
echo "demo command from README: $demo_cmd"
echo "test command from README: $test_cmd"
grep -q "^cargo test --workspace$" <<<"$test_cmd" || { echo "README test command changed; update .ci/run"; exit 1; }

work=$(mktemp -d)
log="$work/demo.log"
# Free ports: the demo falls back to a free port when 8443/8444 are taken.
bash -c "exec $demo_cmd" >"$log" 2>"$work/demo.err" &
pid=$!
cleanup() { kill -9 "$pid" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 1 600); do
  grep -q "Press Ctrl-C to stop." "$log" && break
  if ! kill -0 "$pid" 2>/dev/null; then cat "$log" "$work/demo.err"; echo "demo exited early"; exit 1; fi
  sleep 1
done
grep -q "Press Ctrl-C to stop." "$log" || { cat "$log" "$work/demo.err"; echo "demo never became ready"; exit 1; }
cat "$log"

export HEARTH_PASSWORD="correct horse battery staple"
# Run the printed instructions, in order, as a user would type them.
export_line=$(grep -E '^  export HEARTH_CONFIG_DIR=' "$log")
eval "${export_line#  }"
signup=$(grep -E '^  .* signup ' "$log" | sed 's/^  //')
pair=$(grep -E '^  .* pair ' "$log" | sed 's/^  //')
on=$(grep -E '^  .* on plug$' "$log" | sed 's/^  //')
sleep 2 # let the simulated devices finish their first connection
eval "$signup"
eval "$pair"
out=$(eval "$on")
echo "$out"
grep -q "plug is ON (signed by the device" <<<"$out" || { echo "switching the plug did not work"; exit 1; }

kill -INT "$pid"
for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
if kill -0 "$pid" 2>/dev/null; then echo "demo did not stop on Ctrl-C"; exit 1; fi
wait "$pid" && status=0 || status=$?
[ "$status" = 0 ] || { cat "$work/demo.err"; echo "demo exited with $status after Ctrl-C"; exit 1; }
grep -q "Demo stopped." "$log" || { echo "demo did not report a clean stop"; exit 1; }
echo "README demo check: 1 passed, 0 failed"
