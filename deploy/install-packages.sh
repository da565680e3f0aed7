#!/bin/sh
# Runs inside the Dockerfile's builder stages: install the serving packages into /opt/vae/lib and
# the service into /opt/vae/app, then drop what the server never loads and compile the bytecode, so
# the serving stage copies one ready folder and needs no pip.
#
#   install-packages.sh REQUIREMENTS [WHEELS_DIR]
# With wheels in WHEELS_DIR (prepared by `make wheels`) nothing is fetched: pip itself runs from its
# wheel and installs with --no-index. Without them pip (the base image's) uses the package index.
set -eu
req=$1
wheels=${2:-/nonexistent}

if ls "$wheels"/*.whl >/dev/null 2>&1; then
    pipwheel=$(ls "$wheels"/pip-*.whl | head -n 1)
    set -- python3 "$pipwheel/pip" install --no-index --find-links "$wheels"
else
    set -- python3 -m pip install
fi
"$@" --no-cache-dir --disable-pip-version-check --root-user-action=ignore --no-compile --target /opt/vae/lib --requirement "$req"

cd /opt/vae/lib
# onnxruntime's offline tools (transformer optimizers, quantization), test suites, numpy's Fortran
# wrapper generator, type stubs and console scripts: none are imported when serving.
rm -rf onnxruntime/transformers onnxruntime/quantization onnxruntime/tools onnxruntime/datasets \
       numpy/f2py numpy/distutils bin
find . -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find . -name '*.pyi' -delete
# The wheel's C API library: the Python module links ONNX Runtime statically and never loads it.
if ! ldd onnxruntime/capi/*.so 2>/dev/null | grep -q 'libonnxruntime\.so'; then
    rm -f onnxruntime/capi/libonnxruntime.so*
fi
# Bytecode compiled once, checked by hash not by timestamp: the non-root user cannot write it later.
python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/vae/lib /opt/vae/app
