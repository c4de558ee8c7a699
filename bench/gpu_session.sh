#!/usr/bin/env bash
# One device call that measures everything (issue 12): a quick install that compiles nothing, fastbone._C
# for this card built with nvcc in the background while the Triton steps run (warm the Triton cache, the
# Triton half of the gpu-marked tests, the Triton microbenchmarks), then the CUDA C++ tests and
# microbenchmarks, every registered model end to end at batch 64 and 1 against eager channels_last, and
# torch.compile for a few; each step with its own time budget (542 s in all), the session going on past a
# failing step and a failed build. Steps, budgets and outputs: bench/gpu_session.py; how a lent session
# uses it: bench/README.md.
#
#   bash bench/gpu_session.sh              # on the GPU machine, with its python3; writes to $OUT
#                                          # (else bench/results/<date>-<card>/)
#   bash bench/gpu_session.sh --dry-run    # anywhere: the same steps on the CPU at tiny sizes (CI runs it)
#   bash bench/gpu_session.sh --only models-b64 compile    # a subset (install, environment and the summary
#                                                          # always run)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
exec "$PYTHON" bench/gpu_session.py "$@"
