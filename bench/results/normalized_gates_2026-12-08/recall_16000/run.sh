#!/bin/bash
# Device session of 2026-12-07 (second): issue 13's nsa_norm_long (recall at 128, 16,000 steps,
# normalized gates), 8 seeds as 8 processes of one under MPS. usage: bash .snap/s13.sh PHASE SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 SPARSEDSL_CACHE_DIR=/tmp/x
phase=$1; budget=$2; start=$(date +%s)
logs=/tmp/logs_$phase; mkdir -p $logs /tmp/st
nvidia-smi --query-gpu=name,driver_version --format=csv > $logs/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $logs/gpu.txt
pgrep -f nvidia-cuda-mps-control > /dev/null || nvidia-cuda-mps-control -d
limit=$(( budget - ($(date +%s) - start) - 75 ))
echo "training limit $limit s" | tee -a $logs/gpu.txt
for seed in 0 1 2 3 4 5 6 7; do
  name=nnl_s$seed
  [ -e /tmp/st/$name.done ] && continue
  ( python3 bench/diagnose_recall.py run --variant nsa_norm_long --seeds $seed-$seed \
      --out $logs/$name --state /tmp/st/$name.pt --time-limit $limit > $logs/$name.txt 2>&1
    grep -q '"complete": true' $logs/$name/*.json 2>/dev/null && touch /tmp/st/$name.done ) &
done
wait
ls /tmp/st >> $logs/gpu.txt
tar czf $OUT/logs_$phase.tgz -C /tmp logs_$phase
tail -qn 1 $logs/nnl_s*.txt
