#!/usr/bin/env bash
# gpu_check.sh -- one prepared GPU-readiness check of stylear's decode engine and training step
# on ONE GPU (written for an H200: 141 GB, 16 CPU cores, no internet). About 8 minutes in all.
#
# Put this file in the checkout (e.g. benchmarks/gpu_check.sh: untracked-but-not-ignored files travel
# to the device machine) and run it from the REPOSITORY ROOT:
#     bash benchmarks/gpu_check.sh            # OUT defaults to ./gpu_check_out
# Optional: .whl/*.whl (deepspeed + its deps, open_clip_torch + ftfy/regex/timm/torchvision if absent)
# are installed with --no-index --no-deps into /tmp/site first. ray/diffusers are NOT needed (Ray is
# never started). Without open_clip the decode stages still run (a stub stands in; the decode path
# never builds CLIP); the training stages then fail and say so.
#
# Stages, each time-capped, each appending JSON lines to $OUT/results.jsonl (logs in $OUT/*.log):
#   env     versions, device, which optional packages import
#   sanity  tiny model, fp32, CUDA: teacher-forced logits of StaticKVDecoder with the CUDA graph vs
#           eager (+ a second batch on the same decoder: reset + replay), then a full engine.generate
#           with graphs whose outputs must decode as images. A broken graph path fails HERE
#           (capture error, or graph_vs_eager_max_abs_diff > 1e-4).
#   mid     random Lumina-mGPT-7B bf16 at 768 px, CFG rows 2 (1 image) and 32 (16 images), jumped to
#           mid-image (slot prefix+1175): ms/step of graph replay alone, of the engine's full step
#           (sampling outside the graph), of eager; a cache sized to the current length (a proxy
#           for a length-aware attention kernel); the serving LoRA slot (rank 16, 161 modules);
#           HF generate (32 new tokens, short context) on the same model; bytes floors and roofline
#           fractions (goals: <= 6 ms/step at rows 2; >= 0.70 of weights+KV roofline at rows 32);
#           a profiler top-kernel list of one eager and one graph step at rows 2.
#   train   benchmarks/train.py --preset lumina7b --image-size 768 --zero-stage 2 --micro-batch 2
#           --steps 3 --warmup 1 on mixed-length rows (7B LoRA, bf16), in separate processes (so a
#           missing DeepSpeed does not lose the plain figures):
#             train_plain      runners plain,plain_masked: padding-free vs masked attention, full
#                              activation checkpointing;
#             train_ckpt_half  runner plain with --checkpointing 0.5 and train_ckpt_none with false:
#                              step time and peak GPU memory, to choose the 7B LoRA default of
#                              model.gradient_checkpointing (the smallest fraction that fits);
#             train_deepspeed  runner deepspeed (ZeRO-2, world 1).
#           Each prints tokens/s (real tokens), MFU (model FLOPs: 4N + 2N_lora + causal attention,
#           N without the embedding table) and HFU (+ the checkpointing recompute), with formulas;
#           train_summary compares with the earlier 7,236 tok/s baseline and the >= 45% MFU goal.
#   decode  benchmarks/decode.py --preset lumina7b --device cuda --images 1,16 --repeats 1
#           --hf-steps 32 (CUDA graphs on, the default): whole-image engine ms/step vs generate vs
#           floors, as the project reports it. Last, as it is the longest (~3 min); its table is
#           tee'd to $OUT/decode_bench.log so rows printed before a timeout survive.
# SMOKE=1 runs every stage on the CPU with the tiny preset (to check this script without a GPU).
# STAGES (default env,sanity,mid,train,decode) picks stages, e.g. STAGES=env,train for the training
# figures alone (about 6 minutes on an H100).
set -uo pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-500}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export OUT
export SMOKE=${SMOKE:-0}
PY=${PY:-python3}
RES="$OUT/results.jsonl"
STAGES=",${STAGES:-env,sanity,mid,train,decode},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
DRIVER="${TMPDIR:-/tmp}/stylear_gpu_check_driver.py"

if [ ! -f benchmarks/decode.py ] || [ ! -d stylear_core ]; then
  echo "run from the stylear repository root" >&2; exit 2
fi
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
cap() { local l; l=$(left); if [ "$l" -lt "$1" ]; then l=$(( l > 20 ? l : 20 )); echo "$l"; else echo "$1"; fi; }
note() { echo "{\"stage\": \"$1\", \"status\": \"$2\", \"elapsed_s\": $(( $(date +%s) - START ))}" | tee -a "$RES"; }

# ---- optional wheels --------------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 \
    || echo "pip install of .whl/ failed (see pip.log); continuing" | tee -a "$OUT/pip.log"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/nvidia-smi.txt" 2>&1 || true

cat >"$DRIVER" <<'PYEOF'
import gc, json, os, sys, time, traceback  # noqa: E401
sys.path.insert(0, os.getcwd())
OUT = os.environ["OUT"]; SMOKE = os.environ.get("SMOKE") == "1"
RES = os.path.join(OUT, "results.jsonl")

def emit(**row):
    row["elapsed_wall"] = round(time.time(), 1)
    line = json.dumps(row, default=lambda o: repr(o))
    with open(RES, "a") as f:
        f.write(line + "\n")
    print(line, flush=True)

def stub_open_clip():
    """The decode path never builds CLIP; let stylear_core.models.presets import without open_clip."""
    try:
        import open_clip  # noqa: F401
        return None
    except Exception as e:
        import types
        err = f"{type(e).__name__}: {e}"
        class _Missing:
            def __init__(self, *a, **k):
                raise ImportError("open_clip unavailable: " + err)
        m, tok, tr = (types.ModuleType(n) for n in ("open_clip", "open_clip.tokenizer", "open_clip.transformer"))
        tok.SimpleTokenizer = tr.VisionTransformer = m.CLIP = _Missing
        m.tokenizer, m.transformer = tok, tr
        sys.modules.update({"open_clip": m, "open_clip.tokenizer": tok, "open_clip.transformer": tr})
        return err

import torch
DEV = torch.device("cpu" if SMOKE else "cuda")

def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()

def timed(fn, n):
    sync(); t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(); return (time.perf_counter() - t) / n * 1e3

def env():
    row = {"stage": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": SMOKE,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "gpu_mem_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) if torch.cuda.is_available() else 0}
    for mod in ("transformers", "peft", "accelerate", "deepspeed", "open_clip", "timm", "torchvision", "ftfy"):
        try:
            m = __import__(mod); row[mod] = getattr(m, "__version__", "ok")
        except Exception as e:
            row[mod] = f"MISSING ({type(e).__name__}: {str(e)[:120]})"
    if torch.cuda.is_available():
        b = torch.backends.cuda
        row["sdpa_enabled"] = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                               "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: None)(), "math": b.math_sdp_enabled()}
    emit(**row)

# ------------------------------------------------------------------------------------------- sanity
def teacher_forced(lm, vocab, use_graph, dtype, rows=4, prefix=16, steps=24, passes=2):
    from stylear_core.inference.engine import StaticKVDecoder
    code_ids = vocab.code_to_id.to(DEV)
    dec = StaticKVDecoder(lm, rows, prefix + steps, code_ids, dtype, use_graph)
    g = torch.Generator().manual_seed(0)
    out = []
    for p in range(passes):  # pass 2 re-prefills the same decoder: cache.reset() + replay of the cached graph
        ids = torch.randint(0, vocab.vocab_size, (rows, prefix), generator=g).to(DEV)
        valid = torch.ones(rows, prefix, dtype=torch.bool, device=DEV)
        valid[0, : 5 + p] = False  # left padding on row 0
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = [dec.prefill(lm.model.embed_tokens(ids), valid, pos).clone()]
            toks = torch.randint(0, vocab.vocab_size, (steps - 1, rows), generator=g).to(DEV)
            for i in range(steps - 1):
                logits.append(dec.step(toks[i], prefix + i).clone())
        out.append(torch.stack(logits))
    return torch.stack(out), dec.graph is not None

def sanity():
    from stylear_core.models.backbone import tiny_backbone, tiny_vocab
    from stylear_core.models.presets import tiny_vqgan_codebook_size
    from stylear_core.inference.engine import GenerationRequest, ImageGenerationEngine
    vocab = tiny_vocab(codebook_size=tiny_vqgan_codebook_size())
    torch.manual_seed(0)
    lm = tiny_backbone(vocab).to(DEV).eval()
    row = {"stage": "sanity"}
    try:
        eager, _ = teacher_forced(lm, vocab, False, torch.float32)
        graph, captured = teacher_forced(lm, vocab, DEV.type == "cuda", torch.float32)
        diff = (eager - graph).abs().max().item()
        row.update(graph_captured=captured, graph_vs_eager_max_abs_diff=diff, logits_scale=eager.abs().max().item())
        eng = ImageGenerationEngine(lm, vocab, device=DEV, dtype=torch.float32)  # graphs on by default on CUDA
        reqs = [GenerationRequest([vocab.bos] + list(range(300, 330 + 5 * i)), 128, 128, seed=i) for i in range(3)]
        res = eng.generate(reqs) + eng.generate(reqs[:1])  # 3 -> padded to 4 rows x CFG; then a cached-shape rerun
        decoded = all(r.layout.decode(r.tokens.unsqueeze(0)).shape[-2:] == (r.layout.h_latent, r.layout.w_latent) for r in res)
        same_seed_same_tokens = bool(torch.equal(res[0].tokens, res[3].tokens))
        row.update(engine_generate_ok=True, outputs_decode=decoded, rerun_reproduces=same_seed_same_tokens,
                   ok=bool(captured or DEV.type != "cuda") and diff <= 1e-4 and decoded)
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    emit(**row)

# ---------------------------------------------------------------------------------------------- mid
def mid():
    stub = stub_open_clip()
    from benchmarks.decode import copy_bandwidth, streamed_weight_bytes, time_hf_generate
    from stylear_core.data.layout import ImageTokenLayout
    from stylear_core.data.tokenizer import text_prompt_ids
    from stylear_core.inference.engine import GenerationRequest, ImageGenerationEngine, StaticKVDecoder
    from stylear_core.inference.sampling import BatchSampling, guided_logits, sample_codes
    from stylear_core.models.presets import ModelConfig, build_backbone, build_prompt_tokenizer
    preset, size = ("tiny", 256) if SMOKE else ("lumina7b", 768)
    t0 = time.time()
    cfg = ModelConfig(preset=preset, image_size=size, dtype="float32" if SMOKE else "bfloat16")
    lm, vocab = build_backbone(cfg, DEV)
    lm.eval()
    tok = build_prompt_tokenizer(cfg, vocab)
    prompt = text_prompt_ids(tok, "a watercolour of a lighthouse on a cliff at dusk", size, size)
    layout = ImageTokenLayout.for_resolution(size, size, vocab)
    bw = copy_bandwidth(DEV, 256 if SMOKE else 1024)
    W = streamed_weight_bytes(lm)
    c = lm.config
    kv_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * next(lm.parameters()).element_size()
    eng = ImageGenerationEngine(lm, vocab, device=DEV, max_batch=64, max_cached_decoders=1)
    dtype = eng.dtype
    emit(stage="mid_setup", preset=preset, size=size, build_s=round(time.time() - t0, 1), stub_open_clip=stub,
         copy_bw_GBps=bw / 1e9, weights_GB=W / 1e9, kv_bytes_per_token_row=kv_tok, prompt_len=len(prompt),
         num_tokens=layout.num_tokens, weights_floor_ms=W / bw * 1e3)
    N = 8 if SMOKE else 40
    steps_total = layout.num_tokens - 3
    for images in ((1, 2) if SMOKE else (1, 16)):
        row = {"stage": "mid", "images": images}
        try:
            reqs = [GenerationRequest(prompt, size, size, seed=i) for i in range(images)]
            with torch.inference_mode():
                embeds, valid, positions = eng._prefill_inputs(reqs, layout, True)
                rows, prefix = embeds.shape[0], embeds.shape[1]
                cache_len = prefix + layout.num_tokens - 4
                dec = eng._decoder(rows, cache_len)
                sampling = BatchSampling.build([4.0] * images, [2000] * images, [1.0] * images, list(range(images)),
                                               vocab.codebook_size, DEV)
                sync(); t = time.perf_counter(); logits = dec.prefill(embeds, valid, positions); sync()
                row["prefill_ms"] = (time.perf_counter() - t) * 1e3
                midpos = 3 + steps_total // 2
                slot = [prefix + midpos - 3]
                for layer in dec.cache.layers:  # jump to mid-image: every earlier slot counts as written
                    layer.cumulative_length.fill_(slot[0])
                dec.mask_buf[:, 0, 0, : slot[0]] = 0.0
                fed = torch.full((rows,), int(vocab.code_to_id[0]), device=DEV)
                def graph_step():
                    dec.step(fed, slot[0]); slot[0] += 1
                def full_step():  # what _generate_batch does per code position
                    lg = full_step.logits
                    codes = sample_codes(guided_logits(lg[:images], lg[images:], sampling.cfg_scale), sampling)
                    nxt = eng.code_ids[codes].repeat(2)
                    full_step.logits = dec.step(nxt, slot[0]); slot[0] += 1
                full_step.logits = logits
                for _ in range(3):
                    graph_step()  # first call captures the graph (on CUDA)
                row["graph_captured"] = dec.graph is not None
                row["graph_ms"] = timed(graph_step, N)
                row["full_step_ms"] = timed(full_step, N)
                row["sampling_and_host_ms"] = row["full_step_ms"] - row["graph_ms"]
                dec.use_graph = False
                row["eager_ms"] = timed(graph_step, 3 if not SMOKE else N)
                dec.use_graph = eng.cuda_graphs
                dec = None; eng._decoders.clear(); gc.collect()
                if DEV.type == "cuda":
                    torch.cuda.empty_cache()
                # proxy for a length-aware kernel: a cache only as long as the current position (+ the timed steps)
                proxy = StaticKVDecoder(lm, rows, prefix + midpos - 3 + 3 + N + 8, eng.code_ids, dtype, eng.cuda_graphs)
                proxy.prefill(embeds, valid, positions)
                pslot = [prefix + midpos - 3]
                for layer in proxy.cache.layers:
                    layer.cumulative_length.fill_(pslot[0])
                proxy.mask_buf[:, 0, 0, : pslot[0]] = 0.0
                def proxy_step():
                    proxy.step(fed, pslot[0]); pslot[0] += 1
                for _ in range(3):
                    proxy_step()
                row["length_aware_proxy_graph_ms"] = timed(proxy_step, N)
                proxy = None; gc.collect()
            mid_positions = len(prompt) + midpos  # real tokens a length-aware kernel reads (cond row)
            kv_exact = rows * mid_positions * kv_tok
            kv_full = rows * cache_len * kv_tok
            row.update(rows=rows, prefix=prefix, cache_len=cache_len, mid_slot=prefix + midpos - 3,
                       kv_full_cache_GB=kv_full / 1e9, kv_exact_mid_GB=kv_exact / 1e9,
                       extra_kv_GB_per_step=(kv_full - kv_exact) / 1e9,
                       floor_weights_ms=W / bw * 1e3, floor_weights_kv_ms=(W + kv_exact) / bw * 1e3,
                       floor_full_cache_ms=(W + kv_full) / bw * 1e3)
            row["roofline_fraction_full_step"] = row["floor_weights_kv_ms"] / row["full_step_ms"]
            row["roofline_fraction_graph"] = row["floor_weights_kv_ms"] / row["graph_ms"]
            row["best_possible_fraction_with_full_cache_reads"] = row["floor_weights_kv_ms"] / row["floor_full_cache_ms"]
            row["whole_image_s_at_full_step"] = row["full_step_ms"] * steps_total / 1e3
            row["goal"] = ("<= 6 ms/step (full_step_ms)" if images == 1 else ">= 0.70 roofline_fraction_full_step")
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        emit(**row)
        eng._decoders.clear(); gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    # HF generate on the same model (short context: the first 32 new tokens after the prompt)
    for images in ((1,) if SMOKE else (1, 16)):
        try:
            ms = time_hf_generate(lm, prompt, 2 * images, 8 if SMOKE else 32, min(2000, vocab.vocab_size)) * 1e3
            emit(stage="mid_hf_generate", images=images, rows=2 * images, generate_ms_per_step=ms)
        except Exception as e:
            emit(stage="mid_hf_generate", images=images, error=f"{type(e).__name__}: {e}")
        gc.collect()
    # profile one eager and one graph step at rows 2 (full cache, mid-image)
    if DEV.type == "cuda":
        try:
            from torch.profiler import ProfilerActivity, profile
            reqs = [GenerationRequest(prompt, size, size, seed=0)]
            with torch.inference_mode():
                embeds, valid, positions = eng._prefill_inputs(reqs, layout, True)
                dec = eng._decoder(embeds.shape[0], embeds.shape[1] + layout.num_tokens - 4)
                dec.prefill(embeds, valid, positions)
                s = [embeds.shape[1] + steps_total // 2]  # mid-image slot
                for layer in dec.cache.layers:
                    layer.cumulative_length.fill_(s[0])
                fed = torch.zeros(embeds.shape[0], dtype=torch.long, device=DEV)
                def st():
                    dec.step(fed, s[0]); s[0] += 1
                for mode in ("eager", "graph"):
                    dec.use_graph = mode == "graph"
                    for _ in range(3):
                        st()
                    sync()
                    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        st(); sync()
                    dt = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                    evs = [e for e in prof.key_averages() if "cuda" in str(getattr(e, "device_type", "")).lower()]
                    top = sorted(evs, key=lambda e: -dt(e))[:12]
                    emit(stage="profile_rows2", mode=mode, kernels=sum(e.count for e in evs),
                         device_us_total=sum(dt(e) for e in evs),
                         top=[(e.key[:90], e.count, round(dt(e), 1)) for e in top])
            eng._decoders.clear(); gc.collect(); torch.cuda.empty_cache()
        except Exception as e:
            emit(stage="profile_rows2", error=f"{type(e).__name__}: {e}")
    # the serving configuration: one rank-16 LoRA slot on q/k/v/o, down_proj, lm_head (B = 0, still computed)
    try:
        from stylear_core.inference.adapters import AdapterSlot
        AdapterSlot(lm, rank=16)
        lm.to(dtype)
        reqs = [GenerationRequest(prompt, size, size, seed=0)]
        with torch.inference_mode():
            embeds, valid, positions = eng._prefill_inputs(reqs, layout, True)
            dec = StaticKVDecoder(lm, embeds.shape[0], embeds.shape[1] + layout.num_tokens - 4, eng.code_ids, dtype, eng.cuda_graphs)
            dec.prefill(embeds, valid, positions)
            s = [embeds.shape[1] + steps_total // 2]  # mid-image slot
            for layer in dec.cache.layers:
                layer.cumulative_length.fill_(s[0])
            fed = torch.zeros(embeds.shape[0], dtype=torch.long, device=DEV)
            def st2():
                dec.step(fed, s[0]); s[0] += 1
            for _ in range(3):
                st2()
            emit(stage="mid_lora_slot", images=1, rows=embeds.shape[0], graph_ms_with_lora_slot=timed(st2, N),
                 note="compare with stage mid images=1 graph_ms")
    except Exception as e:
        emit(stage="mid_lora_slot", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])

# ------------------------------------------------------------------------------------------- decode
def decode_bench():
    stub = stub_open_clip()
    import benchmarks.decode as d
    argv = (["--preset", "tiny", "--device", "cpu", "--images", "1,2", "--repeats", "1", "--hf-steps", "8", "--threads", "1"]
            if SMOKE else ["--preset", "lumina7b", "--device", "cuda", "--images", "1,16", "--repeats", "1", "--hf-steps", "32",
                           "--lora-rank", "16"])
    emit(stage="decode_bench_start", argv=argv, stub_open_clip=stub)
    for r in d.main(argv):
        emit(stage="decode_bench", **r)

def train_summary():
    res = {}
    baseline = 7236.0  # tok/s of the earlier 7B LoRA run (MFU then printed by 6N over every parameter)
    for name in ("plain", "ckpt_half", "ckpt_none", "deepspeed"):
        p = os.path.join(OUT, f"train_{name}.json")
        if not os.path.exists(p):
            emit(stage="train", run=name, error="no result file (see train_%s.log)" % name)
            continue
        s = json.load(open(p))
        for runner, r in s["results"].items():
            res[f"{name}/{runner}"] = r
            emit(stage="train", run=name, runner=runner, preset=s.get("preset"), seq=s.get("seq"),
                 row_lengths=s.get("row_lengths"), zero_stage=s.get("zero_stage"),
                 checkpointed_layers=s.get("checkpointed_layers"), flop_counts=s.get("flop_counts"),
                 step_s=r.get("step_s"), tokens_per_step=r.get("tokens"), tokens_per_s=r.get("tokens_per_s"),
                 vs_baseline_7236=(r.get("tokens_per_s") or 0) / baseline, mfu_model_flops=r.get("mfu"),
                 hfu_hardware_flops=r.get("hfu"), peak_mem_gb=r.get("peak_mem_gb"), goal="mfu >= 0.45")
    if "plain/plain" in res and "plain/plain_masked" in res:
        emit(stage="train", runner="padding_free_vs_masked",
             speedup=res["plain/plain_masked"]["step_s"] / res["plain/plain"]["step_s"])
    if "plain/plain" in res and "deepspeed/deepspeed" in res:
        emit(stage="train", runner="deepspeed_vs_plain",
             ratio=res["deepspeed/deepspeed"]["tokens_per_s"] / res["plain/plain"]["tokens_per_s"])

if __name__ == "__main__":
    {"env": env, "sanity": sanity, "mid": mid, "decode": decode_bench, "train_summary": train_summary}[sys.argv[1]]()
PYEOF

run_stage() {  # name, cap seconds, command...
  local name=$1 c; c=$(cap "$2"); shift 2
  note "$name" "start (timeout ${c}s)"
  timeout --kill-after=10 "$c" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  note "$name" "rc=$rc"
  [ $rc -eq 124 ] && echo "{\"stage\": \"$name\", \"error\": \"timed out after ${c}s\"}" >>"$RES"
  return 0
}

want env && run_stage env 60 $PY -u "$DRIVER" env
want sanity && run_stage sanity 90 $PY -u "$DRIVER" sanity
want mid && run_stage mid 170 $PY -u "$DRIVER" mid
if [ "$SMOKE" = 1 ]; then TP=(--preset tiny --steps 2 --warmup 1 --threads 1); else
  TP=(--preset lumina7b --image-size 768 --zero-stage 2 --micro-batch 2 --steps 3 --warmup 1); fi
if want train; then
  run_stage train_plain 200 $PY -u benchmarks/train.py "${TP[@]}" --runners plain,plain_masked --json "$OUT/train_plain.json"
  run_stage train_ckpt_half 110 $PY -u benchmarks/train.py "${TP[@]}" --runners plain --checkpointing 0.5 --json "$OUT/train_ckpt_half.json"
  run_stage train_ckpt_none 110 $PY -u benchmarks/train.py "${TP[@]}" --runners plain --checkpointing false --json "$OUT/train_ckpt_none.json"
  if [ "${SKIP_DS:-0}" != 1 ]; then
    run_stage train_deepspeed 110 $PY -u benchmarks/train.py "${TP[@]}" --runners deepspeed --json "$OUT/train_deepspeed.json"
  fi
  $PY -u "$DRIVER" train_summary >>"$OUT/train_summary.log" 2>&1
fi
# the longest stage last; its table lines are in decode.log even if it is cut off
want decode && run_stage decode 300 $PY -u "$DRIVER" decode
note total "done"
echo "results: $RES"
