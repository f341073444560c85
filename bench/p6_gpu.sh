#!/usr/bin/env bash
# P6 on the GPU machine (no network there): build llama.cpp with CUDA for sm_90 from the source
# vendored in the llama-cpp-python sdist, write a synthetic model, run `python -m bench.p6_gpu`.
#
# Needs .gpu/ (ignored; carried to the machine): llama_src.tar.gz (the sdist, trimmed), whl/ (our
# Python dependencies for the machine's python3), synth_gguf.py, vocab.json.gz and conc.py from
# ../shared/gpu. Resumable: the build runs detached (setsid) and every step is skipped once its
# output exists, so a call that runs out of time is continued by the next one.
#
# STAGES (default "p6"): "p6" runs `python -m bench.p6_gpu` on the 2.35 GB model; "cold" writes
# two more models (about 8 and 16 GB), builds the lazy_mmap shim and runs `python -m
# bench.p6_gpu_cold` (spawn -> first token, page cache dropped) on all three; "p6 cold" runs both;
# "one" runs `python -m bench.p6_one_stream` (one stream's decode against llama-bench's tg128,
# llama-server alone with our command line and one change at a time) on the 2.35 GB model; "loop"
# runs `python -m bench.p6_decode_loop` (llama.cpp's decode loop in our process, no server).
# P6_ARGS, COLD_ARGS and ONE_ARGS are passed on to three of the benchmarks.
set -uo pipefail
STAGES=${STAGES:-p6}
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
# synth NAME n_embd n_layer n_head n_kv_head n_ff: a synthetic F16 llama, written detached.
synth() {
  local name=$1; shift
  [ -e "$W/$name.gguf" ] || [ -e "$W/.synth-$name" ] && return
  touch "$W/.synth-$name"
  [ -e "$W/vocab.json" ] || gunzip -c .gpu/vocab.json.gz >"$W/vocab.json"
  setsid nohup bash -c "PYTHONPATH=$SRC/vendor/llama.cpp/gguf-py python3 .gpu/synth_gguf.py \
    $W/vocab.json $W/$name.tmp $* && mv $W/$name.tmp $W/$name.gguf" \
    >"$W/synth-$name.log" 2>&1 </dev/null &
}
# 1.17 B parameters, F16: about 2.35 GB read per decoded token.
MODELS=(model)
synth model 2048 16 32 8 8192
if [[ " $STAGES " == *" cold "* ]]; then
  # 4096-wide llama blocks (354 MB each in F16) + 805 MB of embedding and output head.
  MODELS+=(model-8gb model-16gb)
  synth model-8gb 4096 20 32 8 11008
  synth model-16gb 4096 43 32 8 11008
fi

missing() {
  [ -e "$BUILD/.done" ] || echo build
  for m in "${MODELS[@]}"; do [ -e "$W/$m.gguf" ] || echo "$m"; done
}
t0=$SECONDS
until [ -z "$(missing)" ]; do
  sleep 5
  # The detached jobs' command lines name their outputs: gone without the output = failed.
  for job in $(missing); do
    if [ "$job" = build ]; then pattern="touch $BUILD/.done"; else pattern="mv $W/$job.tmp"; fi
    if ! pgrep -f "$pattern" >/dev/null; then
      echo "== $job failed"; tail -20 "$W/build.log" "$W"/synth*.log
      cp "$W/build.log" "$W"/synth*.log "$OUT/"; exit 2
    fi
  done
  if [ $SECONDS -ge $((END - 60)) ]; then
    echo "== not ready after $((SECONDS - t0))s ($(missing | xargs)): call again"
    tail -3 "$W/build.log"; exit 3
  fi
done
echo "== build and models ready ($((SECONDS - t0))s waited)"; tail -2 "$W/build.log"
ls -la "$W"/*.gguf
rc=0
if [[ " $STAGES " == *" loop "* ]]; then
  timeout $((END - SECONDS)) python3 -m bench.p6_decode_loop --model "$W/model.gguf" \
    --bin "$BUILD/bin" --out "$W/loop" >"$W/loop.log" 2>&1
  rc=$?
  grep -v "^llama_\|^load\|^print_info\|^ggml_\|^graph_\|^sched_\|^~" "$W/loop.log" | tail -20
  cp "$W/loop/decode-loop.json" "$W/loop/decode-loop.md" "$OUT/" 2>/dev/null
fi
if [ $rc -eq 0 ] && [[ " $STAGES " == *" one "* ]]; then
  timeout $((END - SECONDS)) python3 -m bench.p6_one_stream --model "$W/model.gguf" \
    --bin "$BUILD/bin" --out "$W/one" --resume ${ONE_ARGS:-}
  rc=$?
  cp "$W/one/one-stream.json" "$W/one/one-stream.md" "$W/out/machine.txt" "$OUT/" 2>/dev/null
  tar czf "$OUT/one-logs.tgz" -C "$W/one" --exclude=one-stream.json . 2>/dev/null
fi
if [ $rc -eq 0 ] && [[ " $STAGES " == *" p6 "* ]]; then
  timeout $((END - SECONDS)) python3 -m bench.p6_gpu --model "$W/model.gguf" --bin "$BUILD/bin" \
    --out "$W/out" --resume ${P6_ARGS:-}
  rc=$?
  # Few files: a device call brings back only so many (the logs go in one archive).
  cp "$W/out/p6.json" "$W/out/p6.md" "$W/out/machine.txt" "$OUT/" 2>/dev/null
  tar czf "$OUT/p6-logs.tgz" -C "$W/out" --exclude=p6.json --exclude=p6.md . 2>/dev/null
fi
if [ $rc -eq 0 ] && [[ " $STAGES " == *" cold "* ]]; then
  # The image preloads the shim (layers/Dockerfile.cuda): ours runs with it here too.
  [ -e "$W/liblazy_mmap.so" ] || gcc -O2 -shared -fPIC -o "$W/liblazy_mmap.so" \
    handler/native/lazy_mmap.c -ldl || exit 4
  t1=$SECONDS; sync; echo "== sync: $((SECONDS - t1))s"  # drop_caches drops only clean pages
  timeout $((END - SECONDS)) python3 -m bench.p6_gpu_cold --bin "$BUILD/bin" --out "$W/cold" \
    --model 2="$W/model.gguf" --model 8="$W/model-8gb.gguf" --model 16="$W/model-16gb.gguf" \
    --lazy-mmap "$W/liblazy_mmap.so" --resume ${COLD_ARGS:-}
  rc=$?
  cp "$W/cold/cold.json" "$W/cold/cold.md" "$W/out/machine.txt" "$OUT/" 2>/dev/null
  tar czf "$OUT/cold-logs.tgz" --exclude=cold.json -C "$W/cold" . 2>/dev/null
fi
tail -c 20000 "$W/build.log" >"$OUT/build-tail.log"
exit $rc
