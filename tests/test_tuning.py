"""Tuned W4A16 kernel configurations: keys, per-GPU tables (shipped + user cache), tuning ahead of time, dispatch."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from grace_quant import GraceConfig, quantize_model, tune_model  # noqa: E402
from grace_quant.kernels import dispatch, tables, tuner  # noqa: E402
from grace_quant.kernels import triton_w4a16 as tw  # noqa: E402
from grace_quant.testing import tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_tables(tmp_path, monkeypatch):
    """Every test gets an empty user cache and re-reads the tables."""
    monkeypatch.setenv(tables.CACHE_ENV, str(tmp_path / "cache"))
    tables.reset()
    yield
    tables.reset()


def test_buckets_paths_and_keys():
    m_values = (1, 2, 3, 4, 5, 16, 17, 64, 65, 600, 2048, 100_000)
    assert [dispatch.m_bucket(m) for m in m_values] == [1, 2, 4, 4, 8, 16, 32, 64, 128, 1024, 2048, 2048]
    assert [dispatch.path_for(m) for m in (1, 2, 3, 64, 65, 100_000)] == ["gemv", "gemv", "tc", "tc", "large", "large"]
    assert dispatch.key_for(3, 4096, 11008, 128, torch.bfloat16) == "tc|4|4096|11008|128|bfloat16"
    assert dispatch.key_for(5000, 4096, 4096, 128, torch.float16) == "large|2048|4096|4096|128|float16"
    assert (
        tuner.space_for(65) == tuner.LARGE_SPACE + tuner.WGMMA_SPACE and {"tc": 0} in tuner.LARGE_SPACE
    )  # the fallback races
    assert tuner.space_for(tuner.WGMMA_MAX_M) == tuner.space_for(65)
    beyond = tuner.LARGE_SPACE if tuner.WGMMA_MAX_M < dispatch.M_BUCKETS[-1] else tuner.space_for(65)
    assert tuner.space_for(2 * tuner.WGMMA_MAX_M) == beyond
    # large buckets are timed at both ends (8 tokens above the bucket below, and the top); the others at the top
    assert [tuner.bucket_ms(m) for m in (64, 128, 1024, 2048)] == [(64,), (72, 128), (520, 1024), (1032, 2048)]
    with pytest.raises(ValueError, match="at least 1"):
        dispatch.m_bucket(0)


def test_gluon_candidates_are_checked_tiles_and_the_persistent_form_never_splits_k():
    """Every Gluon entry the tuner can file names a tile the GPU tests check; the warp-specialized persistent form
    (``pipe`` 2) is raced without split-K, and asking it for a split is refused before anything runs."""
    from grace_quant.kernels import gluon_w4a16 as gw

    small = [c for space in tuner.WGMMA_SMALL_SPACE.values() for c in space]
    for config in (*tuner.WGMMA_SPACE, *small):
        tile = gw.tile_of(config)
        assert tile in gw.TILES, config
        assert tile[3] != gw.WS or config["split"] == 1, config
    assert {gw.tile_of(c)[3] for c in tuner.WGMMA_SPACE} == {0, 1, gw.WS}
    with pytest.raises(ValueError, match="takes no split"):
        gw.plan(torch.bfloat16, 256, 1024, 128, False, (128, 128, 4, gw.WS), 2)


def test_gluon_gemv_candidates_are_checked_shapes_raced_up_to_four_tokens():
    """Every Gluon GEMV entry the tuner can file names a shape the GPU tests check; the GEMV races at 1-4 tokens only,
    and an unchecked shape or a split below 1 is refused before anything runs."""
    from grace_quant.kernels import gluon_gemv as gg

    assert {gg.config_of(c) for c in tuner.GEMV4_SPACE} == gg.CONFIGS
    assert all(c["split"] >= 1 for c in tuner.GEMV4_SPACE)
    for m in dispatch.M_BUCKETS:
        raced = [c for c in tuner.space_for(m) if c.get("gemv4")]
        assert len(raced) == (len(tuner.GEMV4_SPACE) if m <= gg.MAX_TOKENS else 0), m
    with pytest.raises(ValueError, match="not one of the checked"):
        gg.plan(torch.bfloat16, 256, 1024, 128, False, (3, 4, 4))
    with pytest.raises(ValueError, match="at least one program"):
        gg.plan(torch.bfloat16, 256, 1024, 128, False, (4, 4, 4), 0)
    with pytest.raises(ValueError, match="do not tile K"):
        gg.plan(torch.bfloat16, 256, 1024, 512, False, (8, 1, 4))  # a 32-word step inside 64-word groups
    assert gg.fits(1024, 512, 2) and gg.fits(11008, 128, 4) and not gg.fits(1000, 8, 4)


def test_user_cache_overrides_shipped_configs_and_saves_atomically(tmp_path):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    key_a, key_b = "gemv|1|64|64|32|float16", "tc|4|64|64|32|float16"
    payload = {"device": "NVIDIA Test GPU", "generation": tables.GENERATION,
               "configs": {key_a: {"block_n": 8}, key_b: {"block_n": 64}}}  # fmt: skip
    (shipped / "NVIDIA_Test_GPU.json").write_text(json.dumps(payload))
    table = tables.ConfigTable("NVIDIA Test GPU", shipped_dir=shipped, user_dir=user)
    table.put(key_b, {"block_n": 32})
    path = table.save()
    assert path == user / "NVIDIA_Test_GPU.json" and [p.name for p in user.iterdir()] == [path.name]  # no temp left
    again = tables.ConfigTable("NVIDIA Test GPU", shipped_dir=shipped, user_dir=user)
    assert again.get(key_a) == {"block_n": 8} and again.get(key_b) == {"block_n": 32}
    # another GPU name finds nothing: names are matched exactly, never by substring
    assert tables.ConfigTable("NVIDIA Test", shipped_dir=shipped, user_dir=user).configs == {}
    assert json.loads(path.read_text())["generation"] == tables.GENERATION


def test_tables_of_another_kernel_generation_are_ignored(tmp_path):
    """A cache tuned for earlier kernels names their configurations: it must not steer the current ones."""
    old = {"device": "GPU X", "configs": {"tc|16|64|64|32|float16": {"block_n": 32, "num_warps": 8}}}  # generation 1
    (tmp_path / "GPU_X.json").write_text(json.dumps(old))
    assert tables.ConfigTable("GPU X", shipped_dir=tmp_path, user_dir=tmp_path / "none").configs == {}
    (tmp_path / "GPU_X.json").write_text(json.dumps({**old, "generation": tables.GENERATION}))
    assert len(tables.ConfigTable("GPU X", shipped_dir=tmp_path, user_dir=tmp_path / "none").configs) == 1


def test_a_corrupt_cache_names_the_file_and_the_fix(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "GPU_X.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="GPU_X.json.*delete the file to re-tune"):
        tables.ConfigTable("GPU X", shipped_dir=tmp_path, user_dir=user)


def test_tune_key_files_the_fastest_runnable_candidate():
    table = tables.table("fake")
    candidates = [{"block_n": 4}, {"block_n": 8}, {"block_n": 16}, {"block_n": 32}]
    times = {4: 3.0, 8: 1.0, 16: 2.0}

    def measure(config):
        if config["block_n"] not in times:
            raise RuntimeError("out of resources")  # a config the GPU rejects is skipped
        return times[config["block_n"]]

    best, seconds = tuner.tune_key("k", candidates, measure, table)
    assert best == {"block_n": 8} and seconds == 1.0 and table.get("k") == {"block_n": 8}
    with pytest.raises(RuntimeError, match="no candidate config ran for k2: .*out of resources"):
        tuner.tune_key("k2", [{"block_n": 32}], measure, table)


def test_tune_model_covers_every_fused_matmul_and_bucket_once(tmp_path):
    model = quantize_model(tiny_model("qwen2-vl"), GraceConfig(mode="packed", group_size=32))
    text = model.config.get_text_config()
    head = text.hidden_size // text.num_attention_heads
    expected_shapes = {
        ((text.num_attention_heads + 2 * text.num_key_value_heads) * head, text.hidden_size),  # q|k|v fused
        (text.hidden_size, text.num_attention_heads * head),  # o_proj
        (2 * text.intermediate_size, text.hidden_size),  # gate|up fused
        (text.hidden_size, text.intermediate_size),  # down_proj
    }
    timed = []

    def factory(m, n, k, group, dtype, device):
        timed.append((m, n, k))
        return lambda config: float(sum(config.values()))  # deterministic: the smallest values win

    tuned = tune_model(model, m_values=(1, 3, 16, 100), measure_factory=factory)
    assert {(n, k) for _, n, k in timed} == expected_shapes
    assert sorted({m for m, _, _ in timed}) == [1, 3, 16, 100] and len(timed) == 4 * len(expected_shapes)
    assert len(tuned) == len(timed)
    best_small = min(tuner.space_for(1), key=lambda c: sum(c.values()))  # the GEMV races the tensor-core kernel
    small = tuner.WGMMA_SMALL_SPACE
    assert (
        tuner.space_for(4) == tuner.GEMV_SPACE + tuner.PIPE_SPACE + tuner.GEMV4_SPACE + tuner.TC_SMALL_SPACE + small[4]
        and tuner.space_for(16) == tuner.TC_SMALL_SPACE + small[16]
    )
    assert tuner.space_for(17) == tuner.TC_SPACE + small[32]
    # the Gluon kernel's small tiles: every bucket up to the tensor-core kernel's, each tile covering the bucket in at
    # most two token tiles
    assert set(small) == {b for b in dispatch.M_BUCKETS if b <= dispatch.TC_MAX_M}
    assert all(2 * c["block_m"] >= b for b, space in small.items() for c in space)
    n, k = next(iter(expected_shapes))
    assert tuned[dispatch.key_for(1, n, k, 32, torch.float32)] == best_small
    assert tuned[dispatch.key_for(100, n, k, 32, torch.float32)] == {"tc": 0}  # dequantize + cuBLAS won the race
    saved = json.loads((tmp_path / "cache" / "kernels" / "triton-interpreter.json").read_text())
    assert saved["configs"] == tuned

    timed.clear()
    assert tune_model(model, m_values=(1, 3, 16, 100), measure_factory=factory) == {} and not timed  # cached
    tables.reset()  # a new process reads the user's cache
    assert tune_model(model, m_values=(1,), measure_factory=factory) == {} and not timed
    assert len(tune_model(model, m_values=(1,), measure_factory=factory, retune=True)) == 4


def test_tune_model_refuses_a_cpu_model_without_a_timer():
    model = quantize_model(tiny_model("llava"), GraceConfig(mode="packed", group_size=32))
    with pytest.raises(RuntimeError, match="needs the INT4 layers on a CUDA GPU"):
        tune_model(model)


def test_dispatch_passes_the_tuned_config_to_the_kernel(monkeypatch):
    calls = []

    def fake_kernel(name):
        def run(x2, packed, scales, bias, group_size, **overrides):
            calls.append((name, overrides))
            return torch.zeros(x2.shape[0], packed.shape[0], dtype=x2.dtype)

        return run

    monkeypatch.setattr(tw, "gemv_w4a16", fake_kernel("gemv"))
    monkeypatch.setattr(tw, "tc_gemm_w4a16", fake_kernel("tc"))
    packed = torch.zeros(48, 8, dtype=torch.int32)
    scales = torch.ones(48, 2, dtype=torch.float16)
    table = tables.table(tables.INTERPRETER_DEVICE)
    table.put(dispatch.key_for(1, 48, 64, 32, torch.float16), {"block_n": 4, "step_k": 512, "num_warps": 2,
                                                               "target_programs_per_sm": 0})  # fmt: skip
    table.put(dispatch.key_for(5, 48, 64, 32, torch.float16), {"tc": 1, "block_n": 32, "num_warps": 8, "num_stages": 2,
                                                               "target_programs_per_sm": 2})  # fmt: skip
    table.put(dispatch.key_for(2, 48, 64, 32, torch.float16), {"tc": 1, "block_m": 16, "block_n": 64, "block_k": 32,
                                                               "num_warps": 4, "num_stages": 3,
                                                               "target_programs_per_sm": 0})  # fmt: skip
    table.put(dispatch.key_for(3, 48, 64, 32, torch.float16), {"block_n": 8, "step_k": 1024, "num_warps": 4,
                                                               "target_programs_per_sm": 4})  # fmt: skip
    for m in (1, 2, 3, 5, 40):
        tw.linear_unchecked(torch.zeros(m, 64, dtype=torch.float16), packed, scales, None, 32)
    sms = tw._sms(torch.zeros(1))
    assert calls == [
        ("gemv", {"block_n": 4, "step_k": 512, "num_warps": 2, "splits": 1}),  # bucket 1: tuned
        ("tc", {"block_m": 16, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": 3, "splits": 1}),  # 2
        ("gemv", {"block_n": 8, "step_k": 1024, "num_warps": 4, "target_programs": 4 * sms}),  # bucket 4: GEMV won
        ("tc", {"block_n": 32, "num_warps": 8, "num_stages": 2, "target_programs": 2 * sms}),  # bucket 8
        ("tc", {}),  # bucket 64
    ]


@pytest.mark.parametrize("bytes_per_copy", [1, 100_000, 8_650_752, 128 * 2**20, 10**9])
def test_timing_copies_cover_l2_rotation_within_the_cap(bytes_per_copy):
    from grace_quant.kernels import timing

    copies = timing.copies_for(bytes_per_copy)
    assert 2 <= copies <= timing.MAX_COPIES
    # enough copies to cycle past ROTATE_BYTES, unless the cap stops it; never one more than needed
    assert copies * bytes_per_copy >= timing.ROTATE_BYTES or copies == timing.MAX_COPIES
    assert copies == 2 or (copies - 1) * bytes_per_copy < timing.ROTATE_BYTES
    with pytest.raises(ValueError, match="positive"):
        timing.copies_for(0)


@pytest.mark.parametrize("path", sorted(tables.SHIPPED_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_tables_name_kernels_that_run_their_keys(path):
    """Every entry of a shipped table names one kernel with that kernel's own settings, and a pipelined-GEMV entry
    fits its key's shape (a step that tiles K in group pairs, at most the GEMV's rows)."""
    from grace_quant.kernels import triton_w4a16 as tw

    data = json.loads(path.read_text())
    assert data["generation"] == tables.GENERATION and path.name == tables._file_name(data["device"])
    kinds = {
        "tc": set(tw._TC_KEYS) | {"tc", "target_programs_per_sm"},
        "gemv": set(tw._GEMV_KEYS) | {"target_programs_per_sm"},
        "pipe": set(tw._PIPE_KEYS) | {"target_programs_per_sm"},
        "wgmma": {"wgmma", "block_m", "block_k", "stages", "pipe", "split"},
        "gemv4": {"gemv4", "rows", "cols", "warps", "split"},
    }
    for key, config in data["configs"].items():
        path_name, bucket, n, k, group, dtype = key.split("|")
        assert key == dispatch.key_for(int(bucket), int(n), int(k), int(group), getattr(torch, dtype)), key
        kind = next((name for name in ("gemv4", "wgmma") if name in config), None) or (
            "pipe" if "block_j" in config else "gemv" if "step_k" in config else "tc"
        )
        assert set(config) <= kinds[kind] or config == {"tc": 0}, (key, config)
        if kind in ("pipe", "gemv", "gemv4"):
            assert int(bucket) <= dispatch.GEMV_ROWS, key
        if kind == "gemv4":  # the Gluon GEMV: a checked shape whose words per thread tile this K, groups unstraddled
            from grace_quant.kernels import gluon_gemv

            assert gluon_gemv.config_of(config) in gluon_gemv.CONFIGS and config["split"] >= 1, key
            assert gluon_gemv.fits(int(k), int(group), config["cols"]), key
        if kind == "wgmma":  # the Gluon kernel: a checked tile, N in whole 128-row programs; small tiles below 128
            from grace_quant.kernels import gluon_w4a16

            tile = gluon_w4a16.tile_of(config)
            assert tile in gluon_w4a16.TILES and int(n) % gluon_w4a16.BLOCK_N == 0, key
            assert (path_name == "large") == (tile[0] >= 128), key
            assert config.get("split", 1) >= 1, key
            assert tile[3] != gluon_w4a16.WS or config.get("split", 1) == 1, key  # the persistent form: no split-K
        if kind == "pipe":
            x = torch.empty(int(bucket), int(k), dtype=getattr(torch, dtype))
            scales = torch.empty(int(n), int(k) // int(group), dtype=x.dtype)
            assert tw.supports_pipe(x, scales, int(group), config["block_j"]), (key, config)
