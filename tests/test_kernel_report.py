"""The static roofline model of benchmarks/kernel_report.py on small hand-computed cases (pure Python,
nothing compiled): the bytes each Triton kernel config moves, where the accumulator traffic goes, the
CUDA launches as read from the launch probe's lines, and the tiles parsed from the CUDA header."""
import re

import pytest

from benchmarks import kernel_report as kr

# B = 1, n = 2 x 2 = 4 positions, C = D = 4, Cv = 3, bfloat16 (2 bytes).
TINY = dict(batch=1, side=2, channels=4, patch_size=1, value_channels=3, dtype="bfloat16", precision=None)


@pytest.mark.parametrize("kernel, label, expected", [
    # 2 programs of 2 queries; each loads all 4 keys' rows and values (2 * 4 * (4 + 3) * 2 = 112) and its own
    # rows once (4 * 4 * 2 = 32), or again per key block (2 * 32 = 64). HBM: Q and K (64), V (24), out (24),
    # lse (16).
    ("_forward_kernel", "M2 N2 D4 w4 s2 one_chunk", kr.Traffic(128, 144)),
    ("_forward_kernel", "M2 N2 D2 w4 s2", kr.Traffic(128, 176)),
    # dQ: K and V per program (112), dOut (24), lse and delta (32) per own row; chunked, Q again per key block
    # (64) and K again to accumulate (64), and the 2 x 4 x 4 float32 dQ rows read and written once more
    # (2 * 64). HBM: Q, K (64), V, dOut (48), lse, delta (32), dQ (64). One program's accumulator: 2 x 4 floats.
    ("_backward_dq_kernel", "M2 N2 D4 w4 s2 one_chunk", kr.Traffic(208, 200)),
    ("_backward_dq_kernel", "M2 N2 D2 w4 s2", kr.Traffic(208, 296, 128, 32)),
    # dK/dV: one program of 4 keys; Q, dOut, lse, delta of every query (56 + 32), its V (24); chunked, K again
    # per query block (64) and Q again to accumulate (32), dK read and written once more (2 * 64).
    # HBM: as dQ's with dK (64) and dV (48) out.
    ("_backward_dkdv_kernel", "M2 N4 D2 w4 s2", kr.Traffic(256, 208, 128, 64)),
])
def test_triton_bytes_by_hand(kernel, label, expected):
    assert kr.triton_traffic(kernel, label, TINY) == expected
    doubled = kr.triton_traffic(kernel, label, TINY | {"batch": 2})
    assert doubled[:3] == tuple(2 * x for x in expected[:3]) and doubled.acc == expected.acc


def test_accumulator_traffic_goes_to_hbm_when_the_resident_accumulators_exceed_the_l2():
    l2 = kr.RATES[90]["l2_bytes"]
    traffic = kr.Traffic(hbm=1e9, l2=2e9, rmw=3e9, acc=l2 / 100)
    fits = kr.roofline_time(90, 0.0, 1.0, 0.0, traffic, programs=99, per_sm=1)  # 99 accumulators fit
    spills = kr.roofline_time(90, 0.0, 1.0, 0.0, traffic, programs=500, per_sm=1)  # 132 resident do not
    assert (fits["rmw_level"], fits["hbm_bytes"], fits["l2_bytes"]) == ("l2", 1e9, 5e9)
    assert (spills["rmw_level"], spills["hbm_bytes"], spills["l2_bytes"]) == ("hbm", 4e9, 2e9)
    assert spills["bound"] == "hbm" and spills["seconds"] > fits["seconds"]


def test_the_choice_counts_the_chunked_backward_accumulator_traffic():
    item = dict(TINY, side=256, channels=256, batch=4, mode="forward+backward", impl="triton")
    rows = [dict(module="correspondence_warp", kernel="_backward_dq_kernel", arch=90, dtype="bfloat16", D=256, CV=3,
                 patch=1, config=config, ok=True, fits=True, stack=0, blocks_per_sm=1, sass={"wgmma": 1})
            for config in ("M128 N64 D64 w8 s4", "M128 N64 D256 w8 s2 one_chunk")]
    chunked = kr.triton_estimate(90, rows[0], item)
    # 4 x 512 programs x 1023 passes over their 128 x 256 float32 rows, read and written.
    assert chunked["rmw_bytes"] == 2 * 4 * 512 * 1023 * 128 * 256 * 4 and chunked["bound"] == "l2"
    (entry,) = kr.roofline(90, rows, [item])
    assert entry["_backward_dq_kernel"]["config"].endswith("one_chunk")


def test_the_mma_tiles_are_parsed_from_the_header():
    tiles = kr.mma_tiles()
    assert set(tiles) == set(kr.MMA_TILES) and all(v > 0 for v in tiles.values())
    text = kr.MMA_HEADER.read_text()
    assert kr.mma_tiles(re.sub(r"kMmaBN = \d+", "kMmaBN = 32", text))["kMmaBN"] == 32
    with pytest.raises(KeyError, match="kMmaRows"):
        kr.mma_tiles(text.replace("kMmaRows", "kRenamed"))


TILES = dict(kMmaRows=128, kMmaBN=64)
BF16 = "__nv_bfloat16, (cocos_kernels::cuda::Precision)0"


def launch(plan: str, kernel: str, patch: int = 1) -> dict:
    """probe_launch of a line as csrc/cuda/testing/launch_probe.cu prints it (the kernel's arguments left out)."""
    return kr.probe_launch(f"{plan} kernel=void cocos_kernels::cuda::{kernel}(...)", patch)


@pytest.mark.parametrize("plan, kernel, patch, expected", [
    ("blocks=3 smem=86016 row_blocks=1 cv_chunks=3", f"forward_mma_kernel<{BF16}, 256, 64>", 1,
     dict(kind="mma", role="forward", dt=256, cvt=64, layout="forward_mma_D256_Cv64", cv_chunks=3)),
    # dQ, dK and dV-only blocks (dv_split), dK/dV blocks without.
    ("blocks=2 smem=157184 row_blocks=1 cv_chunks=2 channels=160 out_d=128 dv_chunk=128 dv_split=1",
     f"backward_dq_mma_kernel<{BF16}, 256, 256>", 1,
     dict(kind="mma", role="dq", layout="backward_dq_mma_D256_Cv256_c160", shared=157184, channels=160)),
    ("blocks=2 smem=157184 row_blocks=1 cv_chunks=2 channels=160 out_d=128 dv_chunk=128 dv_split=1",
     f"backward_dkdv_mma_kernel<{BF16}, 256, 256, false>", 1, dict(role="dk", layout="backward_dk_mma_D256_Cv256_c160")),
    ("blocks=2 smem=157184 row_blocks=1 cv_chunks=2 channels=160 out_d=128 dv_chunk=128 dv_split=1",
     f"backward_dkdv_mma_kernel<{BF16}, 256, 256, true>", 1, dict(role="dv", layout="backward_dv_mma_D256_Cv256_c160")),
    ("blocks=2 smem=144128 row_blocks=1 cv_chunks=1 channels=16 out_d=256 dv_chunk=16 dv_split=0",
     f"backward_dkdv_mma_kernel<{BF16}, 256, 16, false>", 1, dict(role="dkdv", layout="backward_dkdv_mma_D256_Cv16_c16")),
    ("blocks=2 smem=91904 row_blocks=2 cv_chunks=1", f"backward_streamed_mma_kernel<{BF16}, 16, 3, false>", 3,
     dict(kind="streamed", role="dq", cvt=16, group=3, layout="backward_streamed_mma_Cv16_G3")),
    ("blocks=2 smem=91904 row_blocks=2 cv_chunks=1", f"backward_streamed_mma_kernel<{BF16}, 16, 3, true>", 3,
     dict(kind="streamed", role="dkdv", layout="backward_streamed_mma_Cv16_G3")),
    # The wide value tiles (Cv > 64): dK blocks, then dV-only blocks (group 0).
    ("blocks=2 smem=144896 row_blocks=2 cv_chunks=1", f"backward_streamed_mma_kernel<{BF16}, 192, 3, true>", 3,
     dict(kind="streamed", role="dk", cvt=192, group=3, layout="backward_streamed_mma_Cv192_G3")),
    ("blocks=2 smem=129024 row_blocks=2 cv_chunks=1", f"backward_streamed_mma_kernel<{BF16}, 192, 0, true>", 3,
     dict(kind="streamed", role="dv", cvt=192, group=0, layout="backward_streamed_mma_Cv192_G0")),
    ("blocks=1 smem=71424", "forward_kernel<float>", 1, dict(kind="fma", role="forward", layout="forward")),
    ("blocks=1 smem=98304", "backward_dq_kernel<float>", 3, dict(role="dq", layout="backward_dq")),
    ("blocks=1 smem=133120", "backward_dkdv_kernel<float>", 3, dict(role="dkdv", layout="backward_dkdv_windows")),
])
def test_probe_launches_name_their_role_and_layout(plan, kernel, patch, expected):
    parsed = launch(plan, kernel, patch)
    assert parsed["name"] == kernel and parsed | expected == parsed


def test_chunked_mma_backward_work_by_hand():
    # D 256, Cv 151 (tiles of 160 channels) over 4 positions: one block of 128 rows and one streamed block of 64
    # (8192 pairs). dQ (and dK) blocks in two chunks of 128 columns, each S over D (256) and dP over 160
    # channels, dQ += dS K over its 128 columns; dV-only blocks in two chunks of 128 channels, each S again,
    # dV += P^T dOut over 160 channels in all. L2 of dQ, per chunk: K and V rows and Q and dOut (2 x 4 x 407 x 2 B)
    # and the 4 rows' lse and delta (32 B).
    item = dict(TINY, channels=256, value_channels=151, mode="forward+backward")
    plan = "blocks=2 smem=157184 row_blocks=1 cv_chunks=2 channels=160 out_d=128 dv_chunk=128 dv_split=1"
    dq, dk, dv = (launch(plan, f"backward_{kernel}_mma_kernel<{BF16}, 256, 256{flag}>")
                  for kernel, flag in (("dq", ""), ("dkdv", ", false"), ("dkdv", ", true")))
    programs, work, exps, traffic = kr._mma_work(dq, item, TILES)
    assert (programs, work, exps, traffic.l2) == (2, 2 * 8192 * (2 * (256 + 160) + 256), 32, 2 * (2 * 4 * 407 * 2 + 32))
    assert kr._mma_work(dk, item, TILES)[:3] == (programs, work, exps)
    programs, work, exps, _ = kr._mma_work(dv, item, TILES)
    assert (programs, work, exps) == (2, 2 * 8192 * (2 * 256 + 160), 32)


def test_streamed_forward_work_by_hand():
    # 3x3 windows of C = 4 (D = 36): one block of 128 centres, one key block of 128, one value chunk of 16.
    # S: 9 taps of one k16 step each (144 columns), P V: 16 channels, over 128 x 128 pairs. L2: the key block's
    # step copies, 256 rows x 9 taps x 4 columns x 2 B, and the 4 keys' 3 value channels.
    item = dict(TINY, patch_size=3)
    forward = launch("blocks=1 smem=119296 row_blocks=1 cv_chunks=1", f"forward_streamed_mma_kernel<{BF16}, 16, 128>", 3)
    assert (forward["kind"], forward["cvt"], forward["bn"], forward["layout"]) == (
        "streamed", 16, 128, "forward_streamed_mma_Cv16_N128")
    programs, work, exps, traffic = kr._streamed_work(forward, item, TILES)
    assert (programs, work, exps) == (1, 2 * 128 * 128 * (144 + 16), 16)
    assert traffic == kr.Traffic(128, 256 * 9 * 4 * 2 + 4 * 3 * 2)
    # float32 rows with a value chunk of 64 (Cv 17): key blocks of 64. S: 9 taps of one k8 step each (72
    # columns); L2: 192 rows x 9 taps x 4 columns x 4 B, and the 4 keys' 17 value channels.
    item = dict(item, dtype="float32", precision="tf32x3", value_channels=17)
    tf32x3 = "float, (cocos_kernels::cuda::Precision)1"
    forward = launch("blocks=1 smem=119808 row_blocks=1 cv_chunks=1", f"forward_streamed_mma_kernel<{tf32x3}, 64, 64>", 3)
    programs, work, exps, traffic = kr._streamed_work(forward, item, TILES)
    assert (programs, work, exps) == (1, 2 * 128 * 64 * (72 + 64), 16)
    assert traffic.l2 == 192 * 9 * 4 * 4 + 4 * 17 * 4


def test_wide_streamed_forward_work_by_hand():
    # The same windows with Cv 151 (16-bit): the wide value class in 64-key blocks, two chunks of 80 channels
    # (the second 71, padded to 80). Per chunk S over 9 taps of one k16 step (144 columns) and P V over 80
    # channels, over 128 x 64 pairs. L2: each chunk's step copies, 192 rows x 9 taps x 4 columns x 2 B, and the
    # 4 keys' 151 value channels. Cv 130: chunks of 80 and 64 (50 channels padded to 16).
    item = dict(TINY, patch_size=3, value_channels=151)
    forward = launch("blocks=2 smem=119808 row_blocks=1 cv_chunks=2", f"forward_streamed_mma_kernel<{BF16}, 128, 64>", 3)
    assert (forward["cvt"], forward["bn"], forward["layout"]) == (128, 64, "forward_streamed_mma_Cv128_N64")
    programs, work, exps, traffic = kr._streamed_work(forward, item, TILES)
    assert (programs, work, exps) == (2, 2.0 * 128 * 64 * (2 * 144 + 80 + 80), 32)
    assert traffic.l2 == 2 * 192 * 9 * 4 * 2 + 4 * 151 * 2
    item = dict(item, value_channels=130)
    assert kr._streamed_work(forward, item, TILES)[1] == 2.0 * 128 * 64 * (2 * 144 + 80 + 64)


def test_streamed_backward_work_by_hand():
    # 3x3 windows of C = 4 (D = 36) over 16 x 16 = 256 centres: 2 blocks of 128 resident centres, 4 streamed
    # blocks of 64 (65536 pairs), value chunk 16. Per pair S over 9 taps of one k16 step (144 columns), dP over
    # 16 channels, H X_t over 9 taps of 16 columns (144); dK/dV adds dV over 16 channels. L2 per (block,
    # streamed block): the score steps' 192 rows and the second pass's 64, x 9 taps x 4 columns x 2 B (18432);
    # per block every streamed value-like column (256 x 3 x 2 B) and its resident ones (once in all: 1536);
    # lse and delta of 256 queries (2048 B), dK/dV's per block. Planes: 128 x 36 floats a block, read and
    # written per group of streamed blocks after the first: groups of 3 (blocks 1-3, then 4) once, groups of 1
    # three times. HBM: Q, K (4096), dOut, V (3072), lse, delta (2048), dQ's planes (36864).
    item = dict(TINY, side=16, patch_size=3, mode="forward+backward")
    dq, dkdv = (launch("blocks=2 smem=91904 row_blocks=2 cv_chunks=1", f"backward_streamed_mma_kernel<{BF16}, 16, 3, {dk}>", 3)
                for dk in ("false", "true"))
    acc = 128 * 36 * 4
    assert kr._streamed_work(dq, item, TILES) == (2, 2.0 * 65536 * (144 + 16 + 144), 65536, kr.Traffic(
        46080, 8 * 18432 + 2 * 1536 + 1536 + 2048, 2 * 2 * 1 * acc, acc))
    programs, work, exps, traffic = kr._streamed_work(dkdv, item, TILES)
    assert (programs, work, exps) == (2, 2.0 * 65536 * (144 + 16 + 144 + 16), 65536)
    assert traffic == kr.Traffic(46080 + 256 * 3 * 4, 8 * 18432 + 3 * 1536 + 2 * 2048, 2 * 2 * 1 * acc, acc)
    ungrouped = launch("blocks=2 smem=91904 row_blocks=2 cv_chunks=1", f"backward_streamed_mma_kernel<{BF16}, 16, 1, false>", 3)
    assert kr._streamed_work(ungrouped, item, TILES)[3].rmw == 2 * 2 * 3 * acc


def test_wide_streamed_backward_work_by_hand():
    # The same windows with Cv 70 (the wide value tiles, Cv padded to 80). dK blocks: dP over 80 channels, no dV;
    # every streamed dOut column (256 x 70 x 2 B) per block, its resident V once. dV-only blocks (one chunk):
    # S and dV over 80 channels, no second pass and no planes; L2 per (block, streamed block) the score steps'
    # 192 rows x 9 taps x 4 columns x 2 B (13824), lse and delta of 256 queries per block, dOut's columns.
    # HBM: Q, K (4096), dOut, V (2 x 256 x 70 x 2 B), lse, delta (2048), and dK's planes or dV (256 x 70 floats).
    item = dict(TINY, side=16, patch_size=3, value_channels=70, mode="forward+backward")
    plan = "blocks=2 smem=129024 row_blocks=2 cv_chunks=1"
    dk, dv = (launch(plan, f"backward_streamed_mma_kernel<{BF16}, 192, {g}, true>", 3) for g in (3, 0))
    acc, io = 128 * 36 * 4, 4096 + 2 * 256 * 70 * 2 + 2048
    assert kr._streamed_work(dk, item, TILES) == (2, 2.0 * 65536 * (144 + 80 + 144), 65536, kr.Traffic(
        io + 36864, 8 * 18432 + 3 * 256 * 70 * 2 + 2 * 2048, 2 * 2 * 1 * acc, acc))
    assert kr._streamed_work(dv, item, TILES) == (2, 2.0 * 65536 * (144 + 80), 65536, kr.Traffic(
        io + 256 * 70 * 4, 8 * 13824 + 2 * 2048 + 2 * 256 * 70 * 2))


def test_contextual_backward_bytes_by_hand():
    # 16 x 16 = 256 rows of C = 32 float32 a side, 4 blocks of 64: per block pair the x and y chunks and the
    # reloaded y (3 x 64 x 32 x 4 = 24576), per block the row statistics (24 x 256); the dX rows of a block
    # (64 x 32 floats) read and written again per further column block (2 x 4 x 3 x 8192). HBM: x, y (65536),
    # the statistics (6144), dX (32768).
    item = dict(batch=1, side=16, channels=32)
    programs, work, exps, traffic = kr._contextual_work("contextual_backward_dx_kernel", item)
    assert (programs, work, exps) == (4, 2 * 256 ** 2 * 2 * 32, 256 ** 2)
    assert traffic == kr.Traffic(104448, 16 * 24576 + 4 * 6144, 196608, 8192)
