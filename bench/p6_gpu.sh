#!/usr/bin/env bash
# P6 on the GPU machine (no network there): build llama.cpp with CUDA for sm_90 from the source
# vendored in the llama-cpp-python sdist, write a synthetic model, run `python -m bench.p6_gpu`.
#
# Needs .gpu/ (ignored; carried to the machine): llama_src.tar.gz (the sdist, trimmed), whl/ (our
# Python dependencies for the machine's python3), synth_gguf.py, vocab.json.gz and conc.py from
# ../shared/gpu. Resumable: the build runs detached (setsid) and every step is skipped once its
# output exists, so a call that runs out of time is continued by the next one.
set -uo pipefail
END=$((SECONDS + ${P6_TIME_S:-570}))
OUT=${OUT:-/tmp/p6-out}
W=${P6_WORK:-/root/p6}
SRC=$W/llama_cpp_python-0.3.36
BUILD=$W/build
mkdir -p "$W/out" "$OUT"
export PATH=/usr/local/cuda/bin:$PATH

echo "== machine" | tee "$W/out/machine.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
  nvcc --version | tail -2; cmake --version | head -1; echo "ninja $(ninja --version)"
  python3 --version; nproc; uname -r
} 2>&1 | tee -a "$W/out/machine.txt"

SITE=${P6_SITE:-/tmp/site}
[ -d "$SITE/fastapi" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
  --target "$SITE" .gpu/whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=$SITE:$SRC LLAMA_CPP_LIB_PATH=$BUILD/bin

[ -d "$SRC" ] || tar xzf .gpu/llama_src.tar.gz -C "$W"
if [ ! -e "$BUILD/.started" ]; then
  mkdir -p "$BUILD" && touch "$BUILD/.started"
  setsid nohup bash -c "
    cmake -S $SRC/vendor/llama.cpp -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    && cmake --build $BUILD --target llama-server llama-bench llama \
    && touch $BUILD/.done" >"$W/build.log" 2>&1 </dev/null &
fi
if [ ! -e "$W/model.gguf" ] && [ ! -e "$W/.synth" ]; then
  touch "$W/.synth"
  gunzip -c .gpu/vocab.json.gz >"$W/vocab.json"
  # 1.17 B parameters, F16: about 2.35 GB read per decoded token.
  setsid nohup bash -c "PYTHONPATH=$SRC/vendor/llama.cpp/gguf-py python3 .gpu/synth_gguf.py \
    $W/vocab.json $W/model.tmp 2048 16 32 8 8192 && mv $W/model.tmp $W/model.gguf" \
    >"$W/synth.log" 2>&1 </dev/null &
fi

t0=$SECONDS
until [ -e "$BUILD/.done" ] && [ -e "$W/model.gguf" ]; do
  sleep 5
  # The detached jobs' command lines name their outputs: gone without the output = failed.
  if { [ ! -e "$BUILD/.done" ] && ! pgrep -f "touch $BUILD/.done" >/dev/null; } \
     || { [ ! -e "$W/model.gguf" ] && ! pgrep -f "mv $W/model.tmp" >/dev/null; }; then
    echo "== build or model failed"; tail -20 "$W/build.log" "$W/synth.log"
    cp "$W/build.log" "$W/synth.log" "$OUT/"; exit 2
  fi
  if [ $SECONDS -ge $((END - 60)) ]; then
    echo "== not ready after $((SECONDS - t0))s: call again"; tail -3 "$W/build.log"; exit 3
  fi
done
echo "== build and model ready ($((SECONDS - t0))s waited)"; tail -2 "$W/build.log"; ls -la "$W/model.gguf"

timeout $((END - SECONDS)) python3 -m bench.p6_gpu --model "$W/model.gguf" --bin "$BUILD/bin" \
  --out "$W/out" --resume ${P6_ARGS:-}
rc=$?
cp "$W/out"/* "$OUT/" 2>/dev/null
tail -c 20000 "$W/build.log" >"$OUT/build-tail.log"
exit $rc
