#!/bin/sh
# train-then-export.sh NAME TORCHRUN_ARGS...
#
# The PyTorchJob Master's command (pytorchjob.yaml): `torchrun TORCHRUN_ARGS...` (which hold
# `-m training ... --out DIR`), then, once training has succeeded, `python -m export` of DIR/best.pt
# into the model repository ($VAE_MODEL_REPO, default /models) as the next version of NAME.
#
# As a container's command this script is PID 1, and PID 1 ignores any signal it has no handler
# for: a plain `sh -c "torchrun ... && python -m export ..."` would swallow the SIGTERM of a pod's
# eviction and torchrun would be killed at the end of the grace period instead. So it passes
# SIGTERM (and SIGINT) on to torchrun, which passes it to every rank; python -m training then stops
# every rank at the next step and rank 0 writes last.pt there (exit 143): the restarted pod's
# `--resume` continues from that step.
set -u
if [ $# -lt 2 ]; then
  echo "usage: train-then-export.sh NAME TORCHRUN_ARGS..." >&2
  exit 2
fi
name=$1
shift
out=
prev=
for arg in "$@"; do
  [ "$prev" = "--out" ] && out=$arg
  prev=$arg
done
if [ -z "$out" ]; then
  echo "train-then-export.sh: the training flags need --out DIR (the run directory to export from)" >&2
  exit 2
fi

torchrun "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break  # torchrun has ended; otherwise a signal interrupted the wait
done
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
exec python -m export --checkpoint "$out/best.pt" --out "${VAE_MODEL_REPO:-/models}" --name "$name"
