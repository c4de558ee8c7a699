#!/usr/bin/env bash
# What a session lent a GPU runs, in a few device calls (each under the tool's 10-minute cap):
#   bash bench/gpu_session.sh tests    # build for this card, every gpu-marked test
#   bash bench/gpu_session.sh conv     # conv_bn_act microbenchmarks, Triton and CUDA C++, fp16 batch 32
#   bash bench/gpu_session.sh models   # end-to-end resnet50 (batch 64) and vgg16, fp16
# The GPU machine's own python3 has torch, triton, pybind11, pytest(-benchmark, -xdist), timm and
# CuPy; nothing is installed from the network. Logs and JSON go to $OUT (the device tool's
# folder) or bench/results/, to be committed with the card and versions they record.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

install() {
    local cc
    cc=$($py -c "import torch; print('%d%d' % torch.cuda.get_device_capability())") || exit 1
    FASTBONE_CUDA_ARCHS=$cc $py -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
        || { tail -40 "$out/install.log"; exit 1; }
    $py -c "import torch, triton, fastbone, fastbone.cuda as c; print(torch.__version__, triton.__version__, \
torch.cuda.get_device_name(), c.build_status())" | tee "$out/environment.txt"
}

case "${1:-tests}" in
    tests)
        install
        $py -m pytest -m gpu -q -n 4 -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log" | tail -40 ;;
    conv)
        install
        for backend in triton cuda; do
            $py -m pytest bench -q -p no:cacheprovider --bench-backend $backend \
                --benchmark-json="$out/conv-$backend.json" 2>&1 | tee "$out/conv-$backend.log" | tail -30
        done ;;
    models)
        install
        $py bench/bench_models.py --models resnet50 vgg16 --batch 64 --dtype float16 --out "$out" 2>&1 \
            | tee "$out/models.log" | tail -30 ;;
    *)
        echo "usage: bash bench/gpu_session.sh tests|conv|models" >&2; exit 2 ;;
esac
