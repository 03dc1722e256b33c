"""bench/complexity.py: the real main() on the tiny configs, and the two fvcore handles it adds."""
import importlib.util
from pathlib import Path

import fvcore  # noqa: F401  (the dev extra installs it: a missing one fails here rather than skipping)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

_PATH = Path(__file__).resolve().parents[1] / "bench" / "complexity.py"
_spec = importlib.util.spec_from_file_location("bench_complexity", _PATH)
complexity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(complexity)

PRODUCT_WORDS = ("attention", "bmm", "matmul", "linear", "conv", "einsum")


@pytest.mark.parametrize("size", [64, 96])
def test_main_on_tiny_configs(size, capsys):
    rows = complexity.main(["--configs", "denseclip_tiny", "fpn_tiny", "--size", str(size), "--verbose"])
    out = capsys.readouterr().out
    assert [r["config"] for r in rows] == ["denseclip_tiny", "fpn_tiny"]
    for r in rows:
        assert r["config"] in out and r["size"] == (size, size)
        assert r["gflops"] > 0 and r["gflops"] == r["gflops_now"]  # no transposed convs in a ResNet
        model = complexity.build_model(r["config"])
        direct = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text_encoder."))
        assert r["params_m"] == direct / 1e6
        assert not [op for op in r["unsupported"] if any(w in op for w in PRODUCT_WORDS)], r["unsupported"]
        assert r["modules"]["backbone"] > 0 and r["modules"]["decode_head"] > 0
    dense, fpn = rows
    assert dense["text_gflops"] > 0 and fpn["text_gflops"] is None
    assert dense["modules"]["context_decoder"] > 0
    assert dense["by_operator"]["scaled_dot_product_attention"] > 0  # counted, not skipped
    assert dense["gflops"] > fpn["gflops"]


def test_main_on_tiny_detectors(capsys):
    rows = complexity.main(["--configs", "retinanet_denseclip_tiny", "retinanet_tiny", "--size", "96", "128"])
    assert "96x128" in capsys.readouterr().out
    dense, plain = rows
    for r in rows:
        model = complexity.build_model(r["config"])
        direct = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text_encoder."))
        assert r["size"] == (96, 128) and r["params_m"] == direct / 1e6
        assert not [op for op in r["unsupported"] if any(w in op for w in PRODUCT_WORDS)], r["unsupported"]
        assert r["modules"]["backbone"] > 0 and r["modules"]["neck"] > 0 and r["modules"]["head"] > 0
    # the head on P3..P7: 4 + 4 3x3 convs of width 32 and the outputs for 9 anchors x (80 COCO classes + 4 deltas)
    positions = sum(-(-96 // s) * -(-128 // s) for s in (8, 16, 32, 64, 128))
    assert dense["modules"]["head"] * 1e9 == positions * 9 * 32 * (8 * 32 + 9 * 80 + 9 * 4)
    assert dense["text_gflops"] > 0 and dense["modules"]["context_decoder"] > 0 and plain["text_gflops"] is None
    assert dense["gflops"] > plain["gflops"]


def test_flops_grow_with_input_area():
    small, large = (complexity.measure("fpn_tiny", s)["gflops"] for s in (64, 128))
    assert 3.5 < large / small < 4.5  # everything but the tiny constant parts scales with the pixel count


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=False)


class _BmmAttention(nn.Module):  # how torch 1.9's multi_head_attention_forward computed it
    def forward(self, q, k, v):
        B, h, L, d = q.shape
        q, k, v = (t.reshape(B * h, -1, t.shape[-1]) for t in (q, k, v))
        return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)


def test_sdpa_counted_like_two_bmms():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    ours = complexity.flop_analysis(_Attention(), (q, k, v)).total()
    assert ours == 2 * 3 * 5 * 7 * (8 + 4)
    with torch.no_grad():
        from fvcore.nn import FlopCountAnalysis

        assert ours == FlopCountAnalysis(_BmmAttention(), (q, k, v)).total()


def test_conv_counts():
    x = torch.randn(1, 8, 6, 6)
    conv, deconv = nn.Conv2d(8, 4, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)
    assert complexity.flop_analysis(conv, (x,)).total() == 36 * 4 * 8 * 9  # output pixels x Cout x Cin x k
    fca = complexity.flop_analysis(deconv, (x,))
    ops = fca.by_operator()
    assert ops["conv_transpose"] == 36 * 8 * 4 * 4  # today's fvcore: input pixels x prod(weight shape)
    assert fca.total() == 144 * 4 * 4 * 4  # fvcore before 2021-10-27: output pixels x Cout x w.shape[1] x k
    assert fca.total() - ops[complexity.LEGACY_EXTRA] == ops["conv_transpose"]
