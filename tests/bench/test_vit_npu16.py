"""bench/vit_npu16 on the tiny timm-style ViT: with the row unit the softmaxes and layer norms
leave the host, and the inference gets faster on both machines."""
import torch

from bench import vit_npu16


def test_row_unit_rows_on_a_tiny_vit(tmp_path):
    from tests.compile_helpers import calibrated
    from tests.waps_tvm.test_transformer import TimmStyleViT
    from waps_tvm.compiler import lower_artifact
    torch.manual_seed(0)
    art = calibrated(TimmStyleViT().eval(), (3, 16, 16), wbits=8, abits=8, iters=1, samples=8)
    res = vit_npu16.run(lower_artifact(art, 1, "split", target="npu16").program, "tiny")
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        on_host = {"softmax", "layer_norm"} & set(r["host_kinds"])
        assert on_host == (set() if r["row_unit"] else {"softmax", "layer_norm"})
        if r["row_unit"]:
            assert r["speedup_vs_no_row_unit"] > 1 and r["host_share"] < 0.5
    assert "| machine | row unit |" in vit_npu16.render(res)
