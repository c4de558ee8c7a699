#!/usr/bin/env bash
# One device call that measures everything (issue 12): build fastbone._C for sm_90, the gpu-marked tests,
# the microbenchmarks of every op family, every registered model end to end at batch 1 and 64 against
# eager channels_last, torch.compile for a few; each step with its own time budget (525 s in all), the
# session going on past a failing step. Steps, budgets and outputs: bench/gpu_session.py; how a lent
# session uses it: bench/README.md.
#
#   bash bench/gpu_session.sh              # on the GPU machine, with its python3; writes to $OUT
#                                          # (else bench/results/<date>-<card>/)
#   bash bench/gpu_session.sh --dry-run    # anywhere: the same steps on the CPU at tiny sizes (CI runs it)
#   bash bench/gpu_session.sh --only models-b64 compile    # a subset (environment and summary always run)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
exec "$PYTHON" bench/gpu_session.py "$@"
