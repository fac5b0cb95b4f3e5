#!/usr/bin/env bash
# One GPU session's checks and measurements in a single command (the device machine has no pip: the checkout runs
# from PYTHONPATH). Writes logs and result tables under OUT (default ./gpu_out): 1-4 files per stage (the device
# tool brings back at most 8, so pick the stages of one call accordingly).
#
#   bash benchmarks/h200_session.sh            # GPU tests, trainer step (fused fake quant by default), e2e batch 1
#   STAGES="tests kernels" bash benchmarks/h200_session.sh
#
# Stages, run in the order STAGES lists them (each has its own time limit, so a slow one cannot starve the rest):
#   tests    every GPU-marked test: python -m pytest -m gpu (kernels, fused KD, fused fake quant, compile, and
#            the CLI's tune, now 3 buckets via --tokens (it took ~250 s over all 12); 86 tests in 326 s on the H200)
#   trainer-test  the trainer-step benchmark's GPU test (every arm at the small size, in a subprocess; the tests
#            stage leaves it out to stay inside its 540 s)
#   trainer  benchmarks/trainer_step.py --size 1b: plain, floor (plain + teacher forward), qat and grace on the default
#            fake-quant backend (fused kernels on CUDA), qat-torch and grace-torch (the reference path); writes
#            OUT/trainer_step.md and OUT/trainer_step_h200.json (copy it to benchmarks/results/)   (~4-6 min)
#   trainer-extra  the same benchmark's other arms: no-kd, grace+tc (compiled, padded teacher) and grace+liger
#            (needs liger-kernel in .whl/, see below), with plain / floor / grace again for ratios within the
#            run; OUT/trainer_step_extra.md   (~5 min with the teacher's compile; run it in its own device call)
#   trainer-linear  the experimental fused QAT linear (fake_quant_backend="triton_linear": quantized inside the
#            matmul) against the default: plain, qat, qat+linear, grace, grace+linear; OUT/trainer_step_linear.md
#            (first GPU run of those kernels: run STAGES="tests" first, which checks them against the torch path)
#   trainer-profile  plain, floor, qat and grace with one profiled step each (--profile): kernel time vs the step's wall time
#            (how host-bound each step is) and the heaviest operators and kernels; OUT/trainer_profile.md   (~1-2 min)
#   e2e      benchmarks/e2e.py, both models, stock bf16 / GRACE INT4 (grace_decode attention) / bf16 + grace_decode /
#            tinygemm, batch 1 only, one process   (~5 min; deadline 290 s)
#   e2e-llava  LLaVA-1.5-7B, the same four arms at batches 1 and 8 (issue 16), with the compiled-vs-eager token checks
#            and the tight-loop gap: OUT/e2e_llava.{md,json}   (~8-9 min: run it alone in one device call; deadline
#            480 s, arms in order of importance, so a slow compile drops tinygemm first)
#   e2e-qwen   the same for Qwen2-VL-2B: OUT/e2e_qwen.{md,json}   (~7-8 min, alone in one call). Merge the two JSON
#            files with `python benchmarks/e2e.py --merge-json benchmarks/results/e2e_h200.json OUT/e2e_*.json`
#   e2e-defer  stock bf16, GRACE INT4 (deferred stop check on by default: no host sync per token) and GRACE INT4
#            without it (grace-nodefer), LLaVA-1.5-7B and Qwen2-VL-2B, batches 1 and 8   (~8 min, alone in one call)
#   e2e-fast   stock bf16, GRACE INT4 with its defaults (grace: greedy calls through grace_quant.grace_greedy, one
#            compiled step per token) and through transformers' loop (grace-loop: fast_generate=False), batches 1 and 8,
#            with the tight-loop gap per arm: OUT/e2e_fast.{md,json}; LLaVA-1.5-7B (FAST_MODELS=qwen2-vl-2b for the other
#            model, one call each)   (~8-9 min, alone in one call; grace_greedy's GPU tests first, ~100 s, no run if
#            they fail)
#   ttft-lab   benchmarks/ttft_lab.py: one-token generate calls through grace_greedy and transformers' loop,
#            interleaved, before and after each loop's compiled decode, then host vs GPU time (torch profiler) and
#            cProfile: OUT/ttft_lab.txt (~3 min; TTFT_MODEL=qwen2-vl-2b for the other model; run J's unexplained batch-1
#            TTFT, e2e_h200.md)
#   e2e-host   --host-tweaks (no min-length processor, deferred stop check), both models, bf16 and GRACE, batch 1:
#            the generate - tight-loop gap with transformers' host work trimmed   (~5 min)
#   kernels  benchmarks/bench_kernels.py   (~6 min + GemLite's checks and autotuning, at most 150 s, and its timing;
#            run it alone in one device call). Its GemLite arm needs the call to carry `.whl` (see below)
#   tune     tune the kernels for the LLaVA-7B / Qwen2-VL-2B shapes; OUT/kernels/<GPU>.json goes to
#            grace_quant/kernels/configs/
#   small    the Gluon kernels' GPU tests (small token tiles, the Gluon GEMV, split-K, CUDA graphs), then tune_kernels.py
#            --retune for M <= 64 (the small tiles and the Gluon GEMV race the Triton GEMVs and tensor-core kernel) and
#            bench_kernels.py at M = 1-64 with that table (OUT/kernels_h200.{md,json}, OUT/kernels/<GPU>.json), then with
#            the shipped table (OUT/shipped/); the tuning stops if the tests fail   (~5-6 min on an H100: alone in one call)
#   gluon-ncu  Nsight Compute on gluon_profile.py at 2048 x 22016 x 4096: every section with the warp-stall sample
#            counts, then per-SASS-instruction stall samples as CSV (OUT/gluon_ncu.txt, OUT/gluon_ncu_sass.csv)
#   conv     benchmarks/conv_lab.py: the lab kernels with a converter warpgroup (bf16 weight tiles in shared memory,
#            shared-memory-operand MMAs) against cuBLAS bf16 and the Gluon tiles at 600-2048 tokens (OUT/conv_lab.txt;
#            ~1 min; first GPU run: its warp specialization asks for registers no run has tried yet)
#   gemv     the Gluon GEMV's GPU tests, then benchmarks/gemv_lab.py: its shapes and splits against cuBLAS bf16 and the
#            shipped dispatch at 1-4 tokens on both models' shapes (OUT/gemv_lab.txt; ~2 min)
#   repack   benchmarks/repack_lab.py: the Gluon tiles on nibble-permuted words (one shift and one lop3 per pair of codes)
#            and on permuted activations against the checkpoint's layout, same tile and split, all checked
#            (OUT/repack_lab.txt; ~3 min; ran 2026-12-07 on an H100: gluon_h200.md section 9)
#   slab     benchmarks/slab_lab.py: dequantize + cuBLAS in slabs of output rows (each bf16 slab read back from L2) against
#            whole-weight dequantize + cuBLAS, the Gluon tiles and cuBLAS bf16 at 256-2048 tokens (OUT/slab_lab.txt;
#            ~1 min; ran 2026-12-07 on an H100: lost everywhere, gluon_h200.md section 11)
#   large    the Gluon kernel's GPU tests (tiles, splits, the tuner's correctness check; stops if any fails), then a
#            retune of the large buckets (M = 128-2048) and bench_kernels.py at M = 256 and 2048 with that table
#            (OUT/kernels/<GPU>.json, OUT/large/kernels_h200.{md,json}), then with the shipped table (OUT/large_shipped/)
#            (~4 min on an H100)
#   sweep    benchmarks/sweep_kernels.py: every candidate of the tuning space vs cuBLAS bf16 for the 7-linear layer
#            shapes at M = 1, 4, 16, 64, 256, 2048 (OUT/sweep.json; winners to OUT/kernels/<GPU>.json)   (~5 min)
#   ttft     time to first token only, both models, batch 1/8/32, nothing compiled   (~2 min)
#   prefill  benchmarks/prefill.py: TTFT, forward, host and GPU time of the prefill, bf16 vs GRACE with JIT / direct
#            kernel launches, both models, plus cProfile tables (OUT/prefill_cprofile_*.txt), then host_overhead.py
#            (OUT/host_overhead.md)   (~4 min)
#   qwen-profile  Qwen2-VL-2B bf16 vs GRACE with decode + prefill profiles, prefill host time by Python stack (~3 min)
#   fake-quant  benchmarks/fake_quant.py: QAT fake quantization per weight, torch path and fused kernels vs the cast,
#            then the whole linear at 2048 tokens: plain, torch, fused fake quant + cuBLAS, and the experimental
#            quantize-in-matmul kernel at three tile sizes (~2-3 min with the kernels' compiles); FQ_TOKENS=0 skips the
#            whole-linear table; a host table gives the Python + launch cost per call
# Done 2026-12-05 (on an H100): tests (119 passed), e2e-llava (GRACE batch 1 failed: CUDA-graph pool error, fixed
# after), trainer, trainer-extra, trainer-linear (benchmarks/results/{e2e,trainer_step}_h200.md, run E).
# Done 2026-12-06: on the H200, tests (120 passed; the tune test's count was wrong on a GPU with a shipped table, fixed),
# trainer-profile, trainer (run F); on H100s (the tool lent those for the H200 kind afterwards): trainer x3 with the
# grouped fake quant (run G: issue 17's targets met), fake-quant (host table), e2e (LLaVA batch 1, run F: GRACE 1.73x).
# Done 2026-12-06, second session (H100s only; ~5 of 30 minutes lost to refused starts): kernel_lab.py runs 1-3
# (benchmarks/results/kernel_lab_h100.md: pipelined tensor-core kernel lost, pipelined GEMV kept, chunked dequant lost),
# GPU tests of generation / grouped trainer step / tune (6 passed) and of the pipelined GEMV (8 passed), e2e run G
# (LLaVA b1 2.67x, b8 1.83x, Qwen2-VL b1 1.86x; TTFT 1.40x), tune_kernels.py --ms 1,2 (the shipped H100 table).
# Done 2026-12-06, third session (H100s; 30 device minutes): prefill.py x4 (where TTFT goes: host-bound end to end;
# the INT4 calls' per-call dispatch; benchmarks/results/prefill_h100.md), a host-cost lab (its arms now in
# host_overhead.py), GPU tests of the direct launches and eager plans, prefill.py with eager_linear (LLaVA TTFT 1.17-1.19x,
# Qwen2-VL 1.07-1.11x, arms interleaved), the ttft stage, tests (138 passed, 1 skipped), e2e Qwen2-VL b1/b8 (run H: 1.96x
# / 1.71x).
# Done 2026-12-06, fourth session (H100s; ~25 device minutes): prefill.py x3 (shared per-layer dequantize: no gain,
# taken back out; direct C launches: ~1-2 ms), overlap_lab.py (the decoder's prefill is GPU-bound: dequantize +
# cuBLAS = bf16 + the dequantize kernels, no overlap on a side stream), dequant_lab.py (at 51a776c: every tile at the
# copy bandwidth), fused_lab.py x5 (the Gluon lab kernel; correct from run 8: 0.61x / 0.58x / 0.70x cuBLAS bf16 per
# LLaVA layer at M = 256 / 600 / 2048, vs dequantize + cuBLAS 0.49x / 0.64x / 0.85x), tests (145 passed, 1 skipped).
# Results: benchmarks/results/prefill_h100.md (first section).
# Done 2026-12-06, fifth session (H100s; ~22 device minutes, ~8 more lost to refused starts): fused_lab.py runs 12
# and 15 (the pipelined Gluon tiles: LLaVA layer at M = 128 / 256 / 512 0.86x / 0.76x / 0.76x cuBLAS bf16 vs 0.49x /
# 0.51x / 0.59x for dequantize + cuBLAS; ties at 600), overlap_lab.py with cuBLAS SM carve-outs (no gain),
# tune_kernels.py (the H100 table's buckets 128-512), prefill.py with the Gluon kernel in every bucket (LLaVA's GPU
# time worse at ~600 tokens: the tuner races it only up to 512 now), GPU tests of kernels/launch/tuning (119 passed).
# Done 2026-12-06, sixth session (H100s, three calls, ~6 device minutes; ~18 more went to refused or released
# machines): GPU tests of the Gluon kernel with split-K (17 passed) and of kernels/launch/tuning (123 passed),
# host_overhead.py (the planned Gluon launch: 40 us of host per call vs 101 through Triton's JIT), fused_lab.py
# --splits 1,2,4 (prefill_h100.md run 16: LLaVA layer 0.83x / 0.64x / 0.88x cuBLAS bf16 at M = 256 / 600 / 2048),
# tune_kernels.py --ms 128,...,2048 --retune (the shipped H100 table), prefill.py --variants no-wgmma and
# e2e.py --ttft-only (run 17: TTFT LLaVA 1.21x, Qwen2-VL 1.10x).
# Done 2026-12-06, seventh session (two calls on an H200, ~2 device minutes of work; the other ~26 went to about a
# dozen refused starts and one machine taken back mid-call): gluon_profile.py --probe (the Gluon kernel with and without the
# dequantization's arithmetic), ncu --set full at 2048 and 600 tokens, gluon_profile.py --small (16-64-token tiles
# with split-K at M = 1-64: correct, ahead of the shipped kernels at M = 4-16); benchmarks/results/gluon_h200.md.
# Done 2026-12-06, eighth session (H200; ~10 device minutes of work, ~13 lost to failed starts and cool-downs): the
# Gluon GPU tests incl. the new warp-specialized tiles (33 passed), gluon_profile.py --ws, tune_kernels.py at M = 1-64
# (all shapes) and 128-2048 (both models), bench_kernels.py at M = 1-2048 with the merged table, tests of kernels and
# generation with it (140 passed): benchmarks/results/gluon_h200.md sections 4-5, kernels_h200.md.
# Done 2026-12-07, ninth session (one H100 call of ~1.5 device minutes and two short ones; ~15 device minutes went to
# eight refused or failed starts, the H200 never came): conv_lab.py (both converter-warpgroup forms lose:
# gluon_h200.md section 6), the Gluon GEMV's GPU tests (21 passed with the older GEMV tests), gemv_lab.py (its race:
# 1.03-1.14x the shipped kernels at M = 1, 1.18-1.28x at M = 2 on LLaVA shapes) and ncu at M = 1 (section 7).
# Done 2026-12-07, tenth session (H100s only: three calls, ~18 device minutes of work; ~12 went to refused starts and
# cool-downs, the H200 never came): repack_lab.py with the one-lop3 pair shipped on permuted activations (lost: the
# activation copy costs more than the 3-8% the repacked-weight arm gains; reverted; gluon_h200.md section 9), the
# Gluon GPU tests (58 passed, twice), a retune of the large buckets on that code (discarded with it), STAGES=small on
# the reverted code (H100 table at M = 1-64, kernels_h100.md: LLaVA layer M=1 2.73x, M=2-8 1.93-2.17x, M=16 1.94x,
# M=64 1.41x), STAGES=e2e-llava with that table (e2e_h200.md run I: 2.77x / 2.02x).
# Done 2026-12-07, eleventh session (H100s only: the H200 kind was asked for six times; three calls were lent an H100
# under that name, three starts failed; ~25 device minutes of work): STAGES=small (62 GPU tests passed; the H100
# retune at M = 1-64 came out level with the shipped table, not shipped), STAGES=large (the stream-K tests passed,
# 5; the retune filed stream-K for none of 55 keys), slab_lab.py + streamk_lab.py (both lose everywhere: stream-K
# removed from the library, gluon_h200.md sections 10-11), bench_kernels.py at M = 256 / 2048 with the shipped and
# the retuned large buckets back to back (0.85x / 0.83x vs 0.87x / 0.81x: level, not shipped), the Gluon GPU tests
# after the removal (62 passed).
# Planned next session (30 device minutes, 10 per call; failed machine starts cost 1-5 minutes each, a machine can be
# taken back mid-call, and a machine goes back 30 s after a call: have the next command ready). A call for the
# nvidia-h200 kind may run on an H100: guard H200-only work with
# `nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && ...`. Every e2e number so far is an H100's.
# On an H200, in this order:
#  1) issue 16's verdict, one call per model (~8 min LLaVA, ~7.5 min Qwen2-VL): STAGES=verdict-llava, then
#     STAGES=verdict-qwen (e2e.py --interleave --no-checks: decode, TTFT and each arm's peak, arms interleaved), then
#     `prefill.py --variants --rounds 4` for the TTFT timeline;
#  2) STAGES=small (~5 min, alone: the Gluon tests incl. the GEMV's, retune M = 1-64 with the Gluon GEMV in the race,
#     bench M = 1-64); copy OUT/kernels/NVIDIA_H200.json into configs/ (the tuner writes the shipped table merged with
#     what it tuned), update kernels_h200.md/json (keep its M = 256 / 2048 rows) and the README row if it beats the
#     shipped table's bench in OUT/shipped/ (same call, same machine); then step 1 again if time is left (the GEMV
#     entries shorten decode);
#  3) STAGES=large (~4 min): the large buckets retuned on the in-memory word order, bench at 256 / 2048 (issue 15's
#     0.95x floors).
#     What is left at large M is the tile kernel's own efficiency (gluon_h200.md sections 1-4, 9-11, 15): stream-K, a
#     converter warpgroup, L2-sized dequantize slabs and dropping the proxy fence all lost or changed nothing; the
#     offset-MMA form lost at small M (section 14).
# On an H100 only (its tables were retuned on the new word order in the nineteenth and twentieth sessions):
# `e2e.py --interleave` without --no-checks (the greedy-token checks) on a host whose bf16 TTFT reads ~44 ms (run K),
# not ~80 (run L). Nothing of issue 16 or 15 can be settled there.
# Host-bound numbers (trainer steps, time to first token) need a quiet machine: run stages one after another,
# never beside another GPU job on the same host.
#
# Peers that the device machine lacks come as pure-Python wheels in .whl/ (ignored by git, so the device call must
# name it: carry [".whl"]); GemLite 0.6, for the kernels stage, is built on the developer machine with
#   pip wheel --no-deps --no-build-isolation -w .whl gemlite==0.6.0   (from its source distribution on PyPI)
# Liger Kernel 0.8.5, for the trainer-extra stage's grace+liger arm, is a pure-Python wheel on PyPI (its Qwen2-VL
# patch imports on transformers 5.17, the GPU machine's version, not on 5.25):
#   pip download --no-deps -d .whl liger-kernel==0.8.5
# Before any stage, this script installs every .whl/*.whl without an index, which by hand is
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
# (where pip is missing it unzips the wheels into /tmp/site instead: a pure-Python wheel needs nothing more). Without
# .whl/ it installs nothing, and the kernels report says GemLite is not installed.
# Done 2026-12-07, twentieth session (H100 only; the H200 kind was asked for ~10 times: refused starts and back-offs
# cost ~8 device minutes): STAGES=fence (the warp-specialized tiles without the proxy fence: level, dropped;
# gluon_h200.md section 15), STAGES=offset (the offset-MMA form: correct, 12-24% slower at M = 1-64, dropped; section
# 14), STAGES=gluon-ncu with the warp-specialized tile (section 15), STAGES=small (H100 M = 1-64 retuned on the new
# word order, shipped: kernels_h100_small_*_2026-12-07.md), the GPU round trip of an INT4 checkpoint (2 passed).
# Done 2026-12-07, nineteenth session (H100s only; the H200 kind was asked for: two refused starts, then an H100):
# STAGES=large on the H100 (45 GPU tests passed; retune of buckets 128-2048, shipped), verdict-llava and
# verdict-qwen with that table (e2e_h200.md run L: a slow host, peaks -65% / -43%), to_checkpoint / from_checkpoint on
# the GPU (equal to the CPU's bits), prefill.py with the retuned and shipped tables in turn (26.3 vs 27.0 ms of GPU
# time per LLaVA forward: prefill_h100.md run 19).
# Done 2026-12-07, eighteenth session (H100s only; the H200 kind was asked for five times: two refused starts, three
# H100s lent under that name): the in-memory word order (kernels.packing.NIBBLE_COLUMNS) built offline and checked on
# the GPU: test_kernels_gpu.py, repack_lab.py (both orders in one process: memory order 3-9% faster on the Gluon tiles),
# pytest -m gpu (187 passed; 5 failures fixed: unpack's index list inside CUDA-graph capture, stale _compiled_call
# checks; the 21 tests around them passed), bench_kernels.py at M = 1-64, 256, 2048 (kernels_h100_memory_order.md),
# and the old and new code back to back at M = 1-4 (level at the GEMVs, 4-6% faster at M = 4): gluon_h200.md section 13.
# Done 2026-12-07, seventeenth session (H100s only; ~25 device minutes of work, the rest in refused starts):
# ttft_lab (grace_greedy's one-token calls level with transformers' loop: run J's 103.5 ms was the third arm's
# reading), e2e-fast for Qwen2-VL-2B (grace_greedy 2.63x; its third arm slow in both columns), then e2e run K with the
# arms interleaved (LLaVA 3.17x / 2.00x, TTFT 1.16x; Qwen2-VL 2.65x / 2.22x, TTFT 1.12x) and prefill run 18
# (1.25x / 1.09x): e2e_h200.md, prefill_h100.md.
# Done 2026-12-07, twelfth session (H100s only; two calls, ~11 device minutes of work; ~8.5 minutes went to a machine
# taken back mid-call and the rest to refused starts): grace_greedy's GPU tests (4 passed; the stage's 100 s limit was
# too short, now 150 s) and e2e run J (LLaVA-1.5-7B through grace_greedy: 3.25x / 2.15x stock bf16 at batches 1 / 8,
# generate gap 0.025 ms per step; its batch-1 TTFT read 103.5 ms, unexplained): e2e_h200.md.
set -u
OUT="${OUT:-gpu_out}"
STAGES="${STAGES:-tests trainer e2e}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1

SITE=/tmp/site
if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || (mkdir -p "$SITE" && for whl in .whl/*.whl; do python3 -m zipfile -e "$whl" "$SITE" || exit 1; done); then
    export PYTHONPATH="$SITE:$PYTHONPATH"
    echo "wheels: $(cd .whl && echo *.whl) in $SITE"
  else
    echo "wheels: could not install .whl/*.whl; stages run without them" >&2
  fi
fi

for stage in $STAGES; do
  start=$(date +%s)
  case "$stage" in
    tests)
      # the trainer-step benchmark's own GPU test (every arm in a subprocess, up to 480 s) runs in the trainer stage
      timeout 540 python -m pytest -q -m gpu \
        --deselect tests/test_benchmarks.py::test_trainer_step_runs_every_arm_on_cuda_at_the_small_size \
        > "$OUT/gpu_tests.log" 2>&1 ;;
    trainer)
      timeout 540 python benchmarks/trainer_step.py --size 1b --steps 12 --warmup 3 \
        --out "$OUT/trainer_step.md" --json "$OUT/trainer_step_h200.json" > "$OUT/trainer_step.log" 2>&1 ;;
    trainer-test)
      timeout 540 python -m pytest -q -m gpu tests/test_benchmarks.py > "$OUT/trainer_test.log" 2>&1 ;;
    trainer-extra)
      timeout 540 python benchmarks/trainer_step.py --size 1b --steps 12 --warmup 3 \
        --arms plain floor grace no-kd grace+tc grace+liger --json none \
        --out "$OUT/trainer_step_extra.md" > "$OUT/trainer_step_extra.log" 2>&1 ;;
    trainer-linear)
      timeout 540 python benchmarks/trainer_step.py --size 1b --steps 12 --warmup 3 \
        --arms plain qat qat+linear grace grace+linear --json none \
        --out "$OUT/trainer_step_linear.md" > "$OUT/trainer_step_linear.log" 2>&1 ;;
    trainer-profile)
      timeout 300 python benchmarks/trainer_step.py --size 1b --steps 6 --warmup 3 --arms plain floor qat grace \
        --profile plain floor qat grace --json none --out "$OUT/trainer_profile.md" > "$OUT/trainer_profile.log" 2>&1 ;;
    e2e)
      timeout 330 python benchmarks/e2e.py --batches 1 --peer-batches 1 --repeats 5 --deadline-s 290 \
        --out "$OUT/e2e.md" --json "$OUT/e2e.json" --log-dir "$OUT" > "$OUT/e2e.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    e2e-llava|e2e-qwen)
      model=$([ "$stage" = e2e-llava ] && echo llava-1.5-7b || echo qwen2-vl-2b)
      timeout 580 python benchmarks/e2e.py --models "$model" --batches 1 8 --peer-batches 1 8 --repeats 3 \
        --deadline-s 480 --out "$OUT/$stage.md" --json "$OUT/$stage.json" --log-dir "$OUT" > "$OUT/$stage.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    e2e-fast)
      timeout 150 python -m pytest -q -m gpu tests/test_fast_decode.py -p no:cacheprovider > "$OUT/fast_tests.log" 2>&1 \
        || { echo "e2e-fast: GPU tests of grace_greedy failed, no run" >&2; continue; }
      timeout 420 python benchmarks/e2e.py --models ${FAST_MODELS:-llava-1.5-7b} --arms bf16 grace grace-loop --batches 1 8 \
        --repeats 3 --interleave --deadline-s 340 --out "$OUT/e2e_fast.md" --json "$OUT/e2e_fast.json" --log-dir "$OUT" \
        > "$OUT/e2e_fast.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    verdict-llava|verdict-qwen)
      # issue 16's numbers in one call per model: arms interleaved (decode, TTFT and each arm's own peak)
      model=$([ "$stage" = verdict-llava ] && echo llava-1.5-7b || echo qwen2-vl-2b)
      timeout 560 python benchmarks/e2e.py --models "$model" --arms bf16 grace grace-loop --batches 1 8 --repeats 5 \
        --interleave --no-checks --deadline-s 470 --out "$OUT/$stage.md" --json "$OUT/$stage.json" --log-dir "$OUT" \
        > "$OUT/$stage.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    ttft-lab)
      timeout 240 python benchmarks/ttft_lab.py --model ${TTFT_MODEL:-llava-1.5-7b} > "$OUT/ttft_lab.txt" 2>&1 ;;
    e2e-defer)
      timeout 580 python benchmarks/e2e.py --models llava-1.5-7b qwen2-vl-2b --arms bf16 grace grace-nodefer --batches 1 8 \
        --repeats 3 --deadline-s 480 --out "$OUT/e2e_defer.md" --json "$OUT/e2e_defer.json" --log-dir "$OUT" \
        > "$OUT/e2e_defer.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    e2e-host)
      timeout 330 python benchmarks/e2e.py --arms bf16 grace --batches 1 --repeats 3 --host-tweaks --deadline-s 290 \
        --out "$OUT/e2e_host.md" --log-dir "$OUT" > "$OUT/e2e_host.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    kernels)
      timeout 570 python benchmarks/bench_kernels.py --out "$OUT" > "$OUT/kernels.log" 2>&1 ;;
    tune)
      GRACE_QUANT_CACHE="$OUT" timeout 480 python benchmarks/tune_kernels.py > "$OUT/tune.log" 2>&1 ;;
    small)
      timeout 120 python -m pytest -q -m gpu tests/test_kernels_gpu.py -k "wgmma or split or small or gemv or gluon or tuner" \
        -p no:cacheprovider > "$OUT/small_tests.log" 2>&1 || { echo "small: GPU tests failed, no tuning" >&2; continue; }
      GRACE_QUANT_CACHE="$OUT" timeout 290 python benchmarks/tune_kernels.py --retune --ms 1,2,4,8,16,32,64 \
        > "$OUT/tune.log" 2>&1
      GRACE_QUANT_CACHE="$OUT" timeout 150 python benchmarks/bench_kernels.py --ms 1,2,4,8,16,64 --no-gemlite \
        --out "$OUT" > "$OUT/kernels.log" 2>&1
      # the shipped table on the same machine right after: the comparison that decides whether the retune ships
      timeout 150 python benchmarks/bench_kernels.py --ms 1,2,4,8,16,64 --no-gemlite --out "$OUT/shipped" \
        > "$OUT/kernels_shipped.log" 2>&1 ;;
    gluon-ncu)
      ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout 200 "$ncu" --clock-control none --profile-from-start off --set full --import-source no \
        --metrics "regex:smsp__pcsamp_warps_issue_stalled_.*" --print-details all \
        python benchmarks/gluon_profile.py --m 2048 --n 22016 --k 4096 > "$OUT/gluon_ncu.txt" 2>&1
      timeout 120 "$ncu" --clock-control none --profile-from-start off --section SourceCounters --page source \
        --print-source sass --csv python benchmarks/gluon_profile.py --m 2048 --n 22016 --k 4096 \
        > "$OUT/gluon_ncu_sass.csv" 2>&1 ;;
    ttft)
      timeout 240 python benchmarks/e2e.py --ttft-only --batches 1 8 32 --peer-batches 1 --repeats 5 \
        --out "$OUT/ttft.md" --log-dir "$OUT" > "$OUT/ttft.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    prefill)
      timeout 420 python benchmarks/prefill.py --out "$OUT/prefill.md" --json "$OUT/prefill.json" --log-dir "$OUT" \
        > "$OUT/prefill.log" 2>&1
      timeout 120 python benchmarks/host_overhead.py > "$OUT/host_overhead.md" 2>&1 ;;
    qwen-profile)
      timeout 300 python benchmarks/e2e.py --models qwen2-vl-2b --arms bf16 grace --batches 1 --profile bf16 grace \
        --profile-stacks --out "$OUT/qwen_profile.md" --log-dir "$OUT" > "$OUT/qwen_profile.log" 2>&1
      rm -f "$OUT/e2e_raw.json" ;;
    conv)
      timeout 150 python benchmarks/conv_lab.py > "$OUT/conv_lab.txt" 2>&1 ;;
    gemv)
      timeout 120 python -m pytest -q -m gpu tests/test_kernels_gpu.py -k "gluon_gemv or checked_gemv" -p no:cacheprovider \
        > "$OUT/gemv_tests.log" 2>&1
      timeout 300 python benchmarks/gemv_lab.py > "$OUT/gemv_lab.txt" 2>&1 ;;
    repack)
      timeout 480 python benchmarks/repack_lab.py > "$OUT/repack_lab.txt" 2>&1 ;;
    slab)
      timeout 300 python benchmarks/slab_lab.py --ms 600,2048,1024,256 --deadline-s 270 > "$OUT/slab_lab.txt" 2>&1 ;;
    large)
      timeout 120 python -m pytest -q -m gpu tests/test_kernels_gpu.py -k "wgmma or split or tuner" \
        -p no:cacheprovider > "$OUT/large_tests.log" 2>&1 || { echo "large: GPU tests failed, no tuning" >&2; continue; }
      GRACE_QUANT_CACHE="$OUT" timeout 240 python benchmarks/tune_kernels.py --retune \
        --ms 128,256,512,1024,2048 > "$OUT/tune_large.log" 2>&1
      GRACE_QUANT_CACHE="$OUT" timeout 150 python benchmarks/bench_kernels.py --ms 256,2048 --no-gemlite \
        --out "$OUT/large" > "$OUT/kernels_large.log" 2>&1
      timeout 150 python benchmarks/bench_kernels.py --ms 256,2048 --no-gemlite --out "$OUT/large_shipped" \
        > "$OUT/kernels_large_shipped.log" 2>&1 ;;
    sweep)
      GRACE_QUANT_CACHE="$OUT" timeout 420 python benchmarks/sweep_kernels.py --ms 1,4,16,64,256,2048 --out "$OUT" \
        --deadline-s 330 > "$OUT/sweep.log" 2>&1 ;;
    fake-quant)
      timeout 300 python benchmarks/fake_quant.py --tokens "${FQ_TOKENS:-2048}" --out "$OUT/fake_quant.md" > "$OUT/fake_quant.log" 2>&1 ;;
    *)
      echo "unknown stage '$stage' (choose from: verdict-llava verdict-qwen tests trainer trainer-profile trainer-test trainer-extra trainer-linear e2e e2e-llava e2e-qwen e2e-defer e2e-fast ttft-lab e2e-host kernels tune small large slab gluon-ncu conv gemv repack sweep ttft prefill qwen-profile fake-quant)" >&2
      exit 2 ;;
  esac
  echo "stage $stage: exit $? after $(( $(date +%s) - start )) s"
done
